# The three buckets of the design. Access is IAM-only (uniform bucket-level access, no
# ACLs, public access prevented); devices read artifacts and write updates through V4
# signed URLs and resumable upload sessions handed out by task_assignment.

resource "google_storage_bucket" "model" {
  project                     = var.project_id
  name                        = var.buckets.model
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  # Checkpoints are written create-only; versioning also keeps them recoverable from an
  # operator's mistaken delete or overwrite.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      num_newer_versions = var.model_noncurrent_versions
      with_state         = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_storage_bucket" "gradient" {
  project                     = var.project_id
  name                        = var.buckets.gradient
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true # raw updates are transient by design

  # Raw device updates are needed only until their round is aggregated.
  lifecycle_rule {
    condition {
      age = var.gradient_retention_days
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_storage_bucket" "aggregate" {
  project                     = var.project_id
  name                        = var.buckets.aggregate
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true

  lifecycle_rule {
    condition {
      age = var.aggregate_retention_days
    }
    action {
      type = "Delete"
    }
  }
}
