# The HPKE upload key ring (issue 13): devices seal their updates to the current public key.
# Only result_ingestion and aggregator may read the private key ring; task_assignment reads
# the public half it hands to devices. The key material comes from
# `fedcompute ops rotate-upload-key --key-dir DIR` (never generated in Terraform, so the
# private keys stay out of the plan output); a new secret version is a rotation, and the
# ring keeps the previous keys so uploads sealed before it still open.

resource "google_secret_manager_secret" "upload_keys" {
  project   = var.project_id
  secret_id = "fcp-upload-keys"

  replication {
    auto {}
  }
}

resource "google_secret_manager_secret" "upload_public_keys" {
  project   = var.project_id
  secret_id = "fcp-upload-public-keys"

  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "upload_keys" {
  count       = var.key_dir == "" ? 0 : 1
  secret      = google_secret_manager_secret.upload_keys.id
  secret_data = file("${var.key_dir}/upload_keys.json")
}

resource "google_secret_manager_secret_version" "upload_public_keys" {
  count       = var.key_dir == "" ? 0 : 1
  secret      = google_secret_manager_secret.upload_public_keys.id
  secret_data = file("${var.key_dir}/upload_public_keys.json")
}

resource "google_secret_manager_secret_iam_member" "private_accessor" {
  for_each = var.private_accessors

  project   = var.project_id
  secret_id = google_secret_manager_secret.upload_keys.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${each.value}"
}

resource "google_secret_manager_secret_iam_member" "public_accessor" {
  for_each = var.public_accessors

  project   = var.project_id
  secret_id = google_secret_manager_secret.upload_public_keys.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${each.value}"
}
