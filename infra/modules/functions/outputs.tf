output "urls" {
  description = "HTTPS endpoint of each function, by function name."
  value = {
    task_builder     = google_cloudfunctions2_function.task_builder.url
    task_management  = google_cloudfunctions2_function.task_management.url
    task_assignment  = google_cloudfunctions2_function.task_assignment.url
    result_ingestion = google_cloudfunctions2_function.result_ingestion.url
    aggregator       = google_cloudfunctions2_function.aggregator.url
    scheduler        = google_cloudfunctions2_function.scheduler.url
    dashboard        = google_cloudfunctions2_function.dashboard.url
  }
}

output "service_account_emails" {
  description = "Service account of each function, by function name."
  value = {
    task_builder     = google_service_account.task_builder.email
    task_management  = google_service_account.task_management.email
    task_assignment  = google_service_account.task_assignment.email
    result_ingestion = google_service_account.result_ingestion.email
    aggregator       = google_service_account.aggregator.email
    scheduler        = google_service_account.scheduler.email
    dashboard        = google_service_account.dashboard.email
  }
}

output "push_service_account_email" {
  description = "Service account whose OIDC token authenticates the Pub/Sub pushes to the aggregator and the scheduler."
  value       = google_service_account.push.email
}
