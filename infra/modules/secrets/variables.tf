variable "project_id" {
  description = "Project of the secret."
  type        = string
}

variable "accessors" {
  description = "Service account emails allowed to read the API key, by function name."
  type        = map(string)
}
