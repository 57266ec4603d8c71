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
