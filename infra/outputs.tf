output "task_builder_url" {
  description = "Task builder endpoint (authenticated): task_builder_client --task_builder_server=<this>."
  value       = module.functions.urls.task_builder
}

output "task_management_url" {
  description = "Task management endpoint (authenticated; operators and the task builder)."
  value       = module.functions.urls.task_management
}

output "task_assignment_url" {
  description = "Device-facing task assignment endpoint: FEDCOMPUTE_TASK_ASSIGNMENT_URL for the fleet simulator and real devices."
  value       = module.functions.urls.task_assignment
}

output "dashboard_url" {
  description = "Monitoring dashboard (authenticated; open it through `gcloud run services proxy` or with an identity token)."
  value       = module.functions.urls.dashboard
}

output "function_urls" {
  description = "Every function's HTTPS endpoint, by function name."
  value       = module.functions.urls
}

output "service_accounts" {
  description = "The service account each function runs as."
  value       = module.functions.service_account_emails
}

output "model_bucket" {
  description = "Model bucket (FEDCOMPUTE_MODEL_BUCKET): artifacts, checkpoints, metrics."
  value       = module.storage.bucket_names.model
}

output "gradient_bucket" {
  description = "Gradient bucket (FEDCOMPUTE_GRADIENT_BUCKET): raw device updates, deleted after gradient_retention_days."
  value       = module.storage.bucket_names.gradient
}

output "aggregate_bucket" {
  description = "Aggregate bucket (FEDCOMPUTE_AGGREGATE_BUCKET)."
  value       = module.storage.bucket_names.aggregate
}

output "topics" {
  description = "Pub/Sub topic names (each with a <topic>-dead-letter topic)."
  value       = module.pubsub.topic_names
}

output "dead_letter_topics" {
  description = "Dead-letter topic names; pull <topic>-dead-letter-inspect to see poisoned messages."
  value       = module.pubsub.dead_letter_topic_names
}

output "api_key_secret" {
  description = "Secret Manager secret holding the task builder / task management API key (gcloud secrets versions access latest --secret=<this>)."
  value       = module.secrets.api_key_secret_name
}

output "fedcompute_env" {
  description = "Environment for the fedcompute CLI and fleet simulator pointed at this deployment."
  value = {
    FEDCOMPUTE_PROJECT             = var.project_id
    FEDCOMPUTE_MODEL_BUCKET        = module.storage.bucket_names.model
    FEDCOMPUTE_GRADIENT_BUCKET     = module.storage.bucket_names.gradient
    FEDCOMPUTE_AGGREGATE_BUCKET    = module.storage.bucket_names.aggregate
    FEDCOMPUTE_TASK_BUILDER_URL    = module.functions.urls.task_builder
    FEDCOMPUTE_TASK_MANAGEMENT_URL = module.functions.urls.task_management
    FEDCOMPUTE_TASK_ASSIGNMENT_URL = module.functions.urls.task_assignment
  }
}
