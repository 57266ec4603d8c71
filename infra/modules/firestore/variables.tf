variable "project_id" {
  description = "Project of the Firestore database."
  type        = string
}

variable "location" {
  description = "Firestore location: a region (us-central1) or a multi-region (nam5, eur3)."
  type        = string
}
