# One message on scheduler-tick per minute: the scheduler function's housekeeping pass
# (assignment timeouts, stuck rounds, eval iterations, task completion).

resource "google_cloud_scheduler_job" "tick" {
  project     = var.project_id
  region      = var.region
  name        = "fcp-scheduler-tick"
  description = "fedcompute housekeeping tick (scheduler function)"
  schedule    = var.schedule
  time_zone   = "Etc/UTC"

  pubsub_target {
    topic_name = var.topic_id
    data       = base64encode("{\"source\":\"cloud-scheduler\"}")
    attributes = {
      origin = "cloud-scheduler"
    }
  }

  retry_config {
    retry_count = 0 # the next tick is at most a minute away
  }
}
