output "bucket_names" {
  description = "Bucket names by role: model, gradient, aggregate."
  value = {
    model     = google_storage_bucket.model.name
    gradient  = google_storage_bucket.gradient.name
    aggregate = google_storage_bucket.aggregate.name
  }
}
