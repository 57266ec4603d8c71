variable "project_id" {
  description = "Project of the Cloud Scheduler job."
  type        = string
}

variable "region" {
  description = "Region of the Cloud Scheduler job."
  type        = string
}

variable "topic_id" {
  description = "Full id of the scheduler-tick topic (projects/<p>/topics/scheduler-tick)."
  type        = string
}

variable "schedule" {
  description = "Cron schedule of the tick."
  type        = string
  default     = "* * * * *"
}
