variable "project_id" {
  description = "Google Cloud project id to deploy into (it must exist and have billing enabled)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a Google Cloud project id: 6-30 characters, lowercase letters, digits and hyphens, starting with a letter and not ending with a hyphen."
  }
}

variable "region" {
  description = "Region of the functions, buckets, Eventarc trigger and Cloud Scheduler job (e.g. us-central1, europe-west1)."
  type        = string
  default     = "us-central1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a Google Cloud region such as us-central1 or europe-west4 (not a zone like us-central1-a)."
  }
}

variable "firestore_location" {
  description = "Firestore location (a region such as us-central1 or a multi-region such as nam5 / eur3). Empty = var.region."
  type        = string
  default     = ""

  validation {
    condition     = var.firestore_location == "" || can(regex("^([a-z]+-[a-z]+[0-9]+|nam[0-9]+|eur[0-9]+)$", var.firestore_location))
    error_message = "firestore_location must be empty, a region (us-central1) or a Firestore multi-region (nam5, eur3)."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name (service accounts, functions, topics are not prefixed: the code uses fixed topic names)."
  type        = string
  default     = "fcp"

  validation {
    condition     = can(regex("^[a-z][a-z0-9]{1,5}$", var.name_prefix))
    error_message = "name_prefix must be 2-6 lowercase letters or digits, starting with a letter (it becomes part of service account ids)."
  }
}

variable "model_bucket" {
  description = "Name of the model bucket (artifacts, checkpoints, metrics). Empty = \"<project_id>-fcp-model\" (bucket names are global)."
  type        = string
  default     = ""
}

variable "gradient_bucket" {
  description = "Name of the gradient bucket (raw device updates). Empty = \"<project_id>-fcp-gradient\"."
  type        = string
  default     = ""
}

variable "aggregate_bucket" {
  description = "Name of the aggregate bucket (intermediate aggregates). Empty = \"<project_id>-fcp-aggregate\"."
  type        = string
  default     = ""
}

variable "gradient_retention_days" {
  description = "Raw device updates are deleted this many days after upload (privacy: keep them no longer than aggregation needs)."
  type        = number
  default     = 1

  validation {
    condition     = var.gradient_retention_days >= 1 && floor(var.gradient_retention_days) == var.gradient_retention_days
    error_message = "gradient_retention_days must be a whole number of days, at least 1 (lifecycle rules count whole days)."
  }
}

variable "aggregate_retention_days" {
  description = "Objects in the aggregate bucket are deleted this many days after creation."
  type        = number
  default     = 7

  validation {
    condition     = var.aggregate_retention_days >= 1 && floor(var.aggregate_retention_days) == var.aggregate_retention_days
    error_message = "aggregate_retention_days must be a whole number of days, at least 1."
  }
}

variable "functions_source_dir" {
  description = "Folder holding the packaged function zips (<name>.zip), written by `make package`. Relative paths are relative to infra/."
  type        = string
  default     = "../build/functions"
}

variable "light_memory" {
  description = "Memory of the light functions (task_assignment, task_management, result_ingestion, scheduler, dashboard)."
  type        = string
  default     = "512Mi"

  validation {
    condition     = can(regex("^[0-9]+(Mi|Gi)$", var.light_memory))
    error_message = "light_memory must be a Cloud Functions memory size such as 256Mi, 512Mi or 1Gi."
  }
}

variable "light_timeout_seconds" {
  description = "Timeout of the light functions, in seconds."
  type        = number
  default     = 60

  validation {
    condition     = var.light_timeout_seconds >= 1 && var.light_timeout_seconds <= 540
    error_message = "light_timeout_seconds must be between 1 and 540 (result_ingestion is event-driven: 540 s is the Eventarc maximum)."
  }
}

variable "task_builder_memory" {
  description = "Memory of task_builder (TensorFlow graph building and the TFLite flex-ops check)."
  type        = string
  default     = "8Gi"

  validation {
    condition     = can(regex("^[0-9]+(Mi|Gi)$", var.task_builder_memory))
    error_message = "task_builder_memory must be a Cloud Functions memory size such as 4Gi or 8Gi."
  }
}

variable "task_builder_timeout_seconds" {
  description = "Timeout of task_builder, in seconds (HTTP: up to 3600)."
  type        = number
  default     = 900

  validation {
    condition     = var.task_builder_timeout_seconds >= 60 && var.task_builder_timeout_seconds <= 3600
    error_message = "task_builder_timeout_seconds must be between 60 and 3600."
  }
}

variable "aggregator_memory" {
  description = "Memory of the aggregator (holds the model, the running sum and one update at a time)."
  type        = string
  default     = "16Gi"

  validation {
    condition     = can(regex("^[0-9]+(Mi|Gi)$", var.aggregator_memory))
    error_message = "aggregator_memory must be a Cloud Functions memory size such as 4Gi or 16Gi."
  }
}

variable "aggregator_timeout_seconds" {
  description = "Timeout of the aggregator, in seconds. Default 600 = its subscriptions' ack deadline, so a stage that overruns is stopped when Pub/Sub re-delivers it; a big round is split in shards so each stage fits (HTTP limit 3600)."
  type        = number
  default     = 600

  validation {
    condition     = var.aggregator_timeout_seconds >= 60 && var.aggregator_timeout_seconds <= 3600
    error_message = "aggregator_timeout_seconds must be between 60 and 3600."
  }
}

variable "min_instances" {
  description = "Minimum (warm) instances per function, by function name; missing names get 0. A warm task_assignment removes device-visible cold starts at the cost of an always-on instance."
  type        = map(number)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.min_instances : contains(["task_builder", "task_management", "task_assignment", "result_ingestion", "aggregator", "scheduler", "dashboard"], k) && v >= 0 && v <= 10 && floor(v) == v])
    error_message = "min_instances keys must be function names (task_builder, task_management, task_assignment, result_ingestion, aggregator, scheduler, dashboard) and values whole numbers from 0 to 10."
  }
}

variable "max_instances" {
  description = "Maximum instances per function, by function name; missing names get the defaults of the function catalogue (shared/fedcompute/catalogue.py: task_assignment 100, result_ingestion 50, aggregator 5, others 2-3)."
  type        = map(number)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.max_instances : contains(["task_builder", "task_management", "task_assignment", "result_ingestion", "aggregator", "scheduler", "dashboard"], k) && v >= 1 && v <= 1000 && floor(v) == v])
    error_message = "max_instances keys must be function names and values whole numbers from 1 to 1000."
  }
}

variable "scheduler_cron" {
  description = "Cron schedule of the scheduler-tick Cloud Scheduler job (housekeeping: timeouts, stuck rounds, eval iterations)."
  type        = string
  default     = "* * * * *"

  validation {
    condition     = length(split(" ", trimspace(var.scheduler_cron))) == 5
    error_message = "scheduler_cron must be a 5-field cron expression such as \"* * * * *\"."
  }
}

variable "public_task_assignment" {
  description = "Let any device call task_assignment without Google credentials (allUsers run.invoker), as ODP devices do. Set false for a closed test fleet."
  type        = bool
  default     = true
}

variable "upload_keys_dir" {
  description = "Folder with upload_keys.json and upload_public_keys.json from `fedcompute ops rotate-upload-key --key-dir DIR` (HPKE keys for sealed device uploads); empty: devices upload in plaintext."
  type        = string
  default     = ""

  validation {
    condition     = var.upload_keys_dir == "" || (fileexists("${var.upload_keys_dir}/upload_keys.json") && fileexists("${var.upload_keys_dir}/upload_public_keys.json"))
    error_message = "upload_keys_dir must hold upload_keys.json and upload_public_keys.json (run: fedcompute ops rotate-upload-key --key-dir <dir>)."
  }
}
