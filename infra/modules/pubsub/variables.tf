variable "project_id" {
  description = "Project of the topics and subscriptions."
  type        = string
}

variable "project_number" {
  description = "Project number (names the Pub/Sub service agent service-<number>@gcp-sa-pubsub.iam.gserviceaccount.com)."
  type        = string
}

variable "topics" {
  description = "Topic names; each gets a <topic>-dead-letter topic."
  type        = list(string)
}

variable "push_subscriptions" {
  description = "Push subscriptions by name: the topic, the HTTPS endpoint, the service account whose OIDC token authenticates the push, and the ack deadline."
  type = map(object({
    topic                      = string
    push_endpoint              = string
    oidc_service_account_email = string
    ack_deadline_seconds       = number
  }))
  default = {}
}

variable "pull_subscriptions" {
  description = "Pull subscriptions by name (monitoring consumers)."
  type        = map(object({ topic = string }))
  default     = {}
}

variable "max_delivery_attempts" {
  description = "Deliveries before a message goes to the dead-letter topic."
  type        = number
  default     = 5

  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "max_delivery_attempts must be between 5 and 100 (Pub/Sub limits)."
  }
}

variable "minimum_backoff" {
  description = "Minimum retry backoff of every subscription."
  type        = string
  default     = "10s"
}

variable "maximum_backoff" {
  description = "Maximum retry backoff of every subscription."
  type        = string
  default     = "600s"
}

variable "dead_letter_replayers" {
  description = "Service accounts that replay a topic's dead letters (pull from its -dead-letter-inspect subscription), by name: {topic, email}."
  type        = map(object({ topic = string, email = string }))
  default     = {}
}
