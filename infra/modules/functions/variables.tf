variable "project_id" {
  description = "Project of the functions."
  type        = string
}

variable "region" {
  description = "Region of the functions (and of the Eventarc storage trigger: the gradient bucket's region)."
  type        = string
}

variable "name_prefix" {
  description = "Prefix of function names, service account ids and the source bucket."
  type        = string
  default     = "fcp"
}

variable "source_dir" {
  description = "Absolute path of the folder with the packaged <function>.zip files (make package)."
  type        = string
}

variable "buckets" {
  description = "Bucket names by role: model, gradient, aggregate."
  type        = object({ model = string, gradient = string, aggregate = string })
}

variable "topic_ids" {
  description = "Topic ids by topic name (round-ready, round-completed, scheduler-tick)."
  type        = map(string)
}

variable "api_key_secret_id" {
  description = "Secret Manager secret id of the API key (FEDCOMPUTE_API_KEY of task_builder and task_management)."
  type        = string
}

variable "light_memory" {
  description = "Memory of task_assignment, task_management, result_ingestion and scheduler."
  type        = string
  default     = "512Mi"
}

variable "light_timeout_seconds" {
  description = "Timeout of the light functions, in seconds."
  type        = number
  default     = 60
}

variable "task_builder_memory" {
  description = "Memory of task_builder."
  type        = string
  default     = "8Gi"
}

variable "task_builder_timeout_seconds" {
  description = "Timeout of task_builder, in seconds."
  type        = number
  default     = 900
}

variable "aggregator_memory" {
  description = "Memory of the aggregator."
  type        = string
  default     = "16Gi"
}

variable "aggregator_timeout_seconds" {
  description = "Timeout of the aggregator, in seconds."
  type        = number
  default     = 600
}

variable "min_instances" {
  description = "Minimum instances by function name (default 0)."
  type        = map(number)
  default     = {}
}

variable "max_instances" {
  description = "Maximum instances by function name (defaults: max_instances in catalogue.json, from fedcompute.catalogue)."
  type        = map(number)
  default     = {}
}

variable "public_task_assignment" {
  description = "Grant allUsers run.invoker on task_assignment (devices carry no Google credentials)."
  type        = bool
  default     = true
}

variable "upload_keys_secret_id" {
  description = "Secret id of the HPKE private key ring (mounted into result_ingestion and aggregator)."
  type        = string
}

variable "upload_public_keys_secret_id" {
  description = "Secret id of the HPKE public keys (mounted into task_assignment)."
  type        = string
}

variable "upload_keys_configured" {
  description = "Whether the upload key secrets have a version (then sealed uploads are required)."
  type        = bool
}
