variable "project_id" {
  description = "Project of the secrets."
  type        = string
}

variable "key_dir" {
  description = "Folder holding upload_keys.json and upload_public_keys.json (fedcompute ops rotate-upload-key --key-dir); empty: no keys yet, devices upload in plaintext."
  type        = string
  default     = ""
}

variable "private_accessors" {
  description = "Service account emails that may read the private key ring (result_ingestion, aggregator), by function name."
  type        = map(string)
}

variable "public_accessors" {
  description = "Service account emails that may read the public keys (task_assignment), by function name."
  type        = map(string)
}
