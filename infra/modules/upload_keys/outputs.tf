output "configured" {
  description = "Whether key material was provided (the functions then require sealed uploads)."
  value       = var.key_dir != ""
}

output "upload_keys_secret_id" {
  description = "Secret id of the private key ring; ready once the accessors are granted."
  value       = google_secret_manager_secret.upload_keys.secret_id
  depends_on  = [google_secret_manager_secret_iam_member.private_accessor, google_secret_manager_secret_version.upload_keys]
}

output "upload_public_keys_secret_id" {
  description = "Secret id of the public keys; ready once the accessors are granted."
  value       = google_secret_manager_secret.upload_public_keys.secret_id
  depends_on  = [google_secret_manager_secret_iam_member.public_accessor, google_secret_manager_secret_version.upload_public_keys]
}
