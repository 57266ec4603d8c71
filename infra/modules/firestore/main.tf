# Firestore (native mode) holds populations/{pop}/tasks/{id}/iterations/{n}/assignments/{id}.
#
# Indexes: every query the code runs is served by Firestore's automatic single-field
# indexes (assignments filtered by `status` only, counted or streamed; the `tasks`
# collection group listed without filters), so no composite index is declared: an unused
# composite index would only add write cost to every check-in. Add google_firestore_index
# resources here if a query gains a second filter or an order (Firestore's error message
# then carries the exact index to create).

resource "google_firestore_database" "default" {
  project                     = var.project_id
  name                        = "(default)"
  location_id                 = var.location
  type                        = "FIRESTORE_NATIVE"
  concurrency_mode            = "OPTIMISTIC"
  app_engine_integration_mode = "DISABLED"
  # Keep the data when the stack is destroyed (`make destroy` removes compute, not state).
  deletion_policy = "ABANDON"
}

# Single-field index exemptions. Firestore indexes every field by default, and an index on a
# value that only grows (a timestamp written by every check-in or upload) sends all of its
# writes to one tablet: ~500 writes/s for the whole collection group. No query filters or
# orders on these fields, so they are not indexed at all. The scheduler finds expired
# assignments on (status, updated_bucket): a 10 s bucket of `updated_time`, whose index
# entries within a bucket are ordered by the random assignment id (the composite index below).
locals {
  unindexed_fields = {
    "assignments.created_time" = { collection = "assignments", field = "created_time" }
    "assignments.updated_time" = { collection = "assignments", field = "updated_time" }
    "accepted.time"            = { collection = "accepted", field = "time" }
    "rejections.time"          = { collection = "rejections", field = "time" }
    "counters.issued"          = { collection = "counters", field = "issued" }
    "counters.filled"          = { collection = "counters", field = "filled" }
  }
}

resource "google_firestore_field" "unindexed" {
  for_each   = local.unindexed_fields
  project    = var.project_id
  database   = google_firestore_database.default.name
  collection = each.value.collection
  field      = each.value.field

  # An empty index_config removes the automatic single-field indexes of this field.
  index_config {}
}

# The scheduler's bounded expiry query (fedcompute.adapters.firestore_store.expired_assignments):
# status == S and updated_bucket < B, limit N.
resource "google_firestore_index" "assignments_expiry" {
  project    = var.project_id
  database   = google_firestore_database.default.name
  collection = "assignments"

  fields {
    field_path = "status"
    order      = "ASCENDING"
  }
  fields {
    field_path = "updated_bucket"
    order      = "ASCENDING"
  }
}
