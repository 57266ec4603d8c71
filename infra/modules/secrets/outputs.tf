output "api_key_secret_id" {
  description = "Secret id of the API key (for secret_environment_variables); ready once the accessors are granted."
  value       = google_secret_manager_secret.api_key.secret_id
  # A function revision that mounts the secret is rejected until its account may read it.
  depends_on = [google_secret_manager_secret_iam_member.accessor, google_secret_manager_secret_version.api_key]
}

output "api_key_secret_name" {
  description = "Full resource name of the API key secret."
  value       = google_secret_manager_secret.api_key.name
}
