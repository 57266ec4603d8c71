variable "project_id" {
  description = "Project of the buckets."
  type        = string
}

variable "region" {
  description = "Bucket location (a region: the Eventarc storage trigger must be in the bucket's region)."
  type        = string
}

variable "buckets" {
  description = "Bucket names by role: model, gradient, aggregate."
  type        = object({ model = string, gradient = string, aggregate = string })
}

variable "gradient_retention_days" {
  description = "Age in days after which raw device updates are deleted from the gradient bucket."
  type        = number
  default     = 1
}

variable "aggregate_retention_days" {
  description = "Age in days after which objects are deleted from the aggregate bucket."
  type        = number
  default     = 7
}

variable "model_noncurrent_versions" {
  description = "How many noncurrent versions of each model-bucket object to keep (versioning protects checkpoints)."
  type        = number
  default     = 3
}
