# The six Cloud Functions (2nd gen), one service account each, and least-privilege IAM
# scoped to the bucket / topic / service a function touches. Project-wide roles are
# limited to what cannot be scoped: Firestore access (roles/datastore.user), receiving
# Eventarc events, and the build's log and image writes.

locals {
  # Per-function values from the one function catalogue (fedcompute.catalogue), written by
  # `python -m fedcompute.deploy.catalogue --write` (`make package` runs it). The heavy functions
  # (TensorFlow 2.14, protobuf 4.25) run on python311; the light ones on python312 with their
  # own lock (functions/light/uv.lock). Concurrency = requests one instance serves at once.
  catalogue             = jsondecode(file("${path.module}/catalogue.json"))
  functions             = keys(local.catalogue)
  runtimes              = { for f, spec in local.catalogue : f => spec.runtime }
  default_max_instances = { for f, spec in local.catalogue : f => spec.max_instances }
  concurrency           = { for f, spec in local.catalogue : f => spec.concurrency }
  min_instances         = { for f in local.functions : f => lookup(var.min_instances, f, 0) }
  max_instances         = { for f in local.functions : f => lookup(var.max_instances, f, local.default_max_instances[f]) }

  memory = {
    task_builder     = var.task_builder_memory
    task_management  = var.light_memory
    task_assignment  = var.light_memory
    result_ingestion = var.light_memory
    aggregator       = var.aggregator_memory
    scheduler        = var.light_memory
    dashboard        = var.light_memory
  }
  # Cloud Run's CPU floor for a memory size: > 4 GiB needs 2 vCPU, > 8 GiB needs 4.
  memory_mib = { for f, m in local.memory : f => tonumber(regex("^[0-9]+", m)) * (endswith(m, "Gi") ? 1024 : 1) }
  cpu        = { for f, mib in local.memory_mib : f => mib > 8192 ? "4" : (mib > 4096 ? "2" : "1") }

  # What every function reads (fedcompute.settings.Settings.from_env). An empty
  # FEDCOMPUTE_STORAGE_PUBLIC_URL makes task_assignment hand out V4 signed URLs.
  common_env = {
    FEDCOMPUTE_PROJECT            = var.project_id
    FEDCOMPUTE_MODEL_BUCKET       = var.buckets.model
    FEDCOMPUTE_GRADIENT_BUCKET    = var.buckets.gradient
    FEDCOMPUTE_AGGREGATE_BUCKET   = var.buckets.aggregate
    FEDCOMPUTE_STORAGE_PUBLIC_URL = ""
    LOG_EXECUTION_ID              = "true"
    # Devices sign their requests; uploads are sealed once upload keys are configured.
    FEDCOMPUTE_DEVICE_AUTH       = "required"
    FEDCOMPUTE_UPLOAD_ENCRYPTION = var.upload_keys_configured ? "required" : "optional"
    # TensorFlow's C++ log lines are plain text (even at import): off, so the logs are JSON only;
    # failures still surface as Python exceptions, logged as JSON with their traceback.
    TF_CPP_MIN_LOG_LEVEL = "3"
  }

  round_ready_topic       = var.topic_ids["round-ready"]
  round_completed_topic   = var.topic_ids["round-completed"]
  aggregation_shard_topic = var.topic_ids["aggregation-shard"]
}

data "google_project" "this" {
  project_id = var.project_id
}

data "google_storage_project_service_account" "gcs_agent" {
  project = var.project_id
}

# ---------------------------------------------------------------------------- sources

resource "google_storage_bucket" "sources" {
  project                     = var.project_id
  name                        = "${var.project_id}-${var.name_prefix}-sources"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true
}

# The object name carries the zip's hash: a changed package is a new object, which
# re-deploys exactly the functions whose code or pins changed.
resource "google_storage_bucket_object" "source" {
  for_each = toset(local.functions)

  name   = "${each.key}-${filemd5("${var.source_dir}/${each.key}.zip")}.zip"
  bucket = google_storage_bucket.sources.name
  source = "${var.source_dir}/${each.key}.zip"
}

# ----------------------------------------------------------------- service accounts

resource "google_service_account" "build" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-function-build"
  display_name = "fedcompute: Cloud Build of the functions"
}

resource "google_service_account" "task_builder" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-task-builder"
  display_name = "fedcompute task_builder function"
}

resource "google_service_account" "task_management" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-task-management"
  display_name = "fedcompute task_management function"
}

resource "google_service_account" "task_assignment" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-task-assignment"
  display_name = "fedcompute task_assignment function"
}

resource "google_service_account" "result_ingestion" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-result-ingestion"
  display_name = "fedcompute result_ingestion function"
}

resource "google_service_account" "aggregator" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-aggregator"
  display_name = "fedcompute aggregator function"
}

resource "google_service_account" "scheduler" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-scheduler"
  display_name = "fedcompute scheduler function"
}

resource "google_service_account" "dashboard" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-dashboard"
  display_name = "fedcompute dashboard function"
}

# Identity of the Pub/Sub push subscriptions that invoke the aggregator and the scheduler.
resource "google_service_account" "push" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-pubsub-push"
  display_name = "fedcompute Pub/Sub push to functions"
}

# --------------------------------------------------------------------- build identity

resource "google_project_iam_member" "build_logs" {
  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = "serviceAccount:${google_service_account.build.email}"
}

resource "google_project_iam_member" "build_images" {
  project = var.project_id
  role    = "roles/artifactregistry.writer"
  member  = "serviceAccount:${google_service_account.build.email}"
}

resource "google_storage_bucket_iam_member" "build_sources" {
  bucket = google_storage_bucket.sources.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.build.email}"
}

# ----------------------------------------------------------------------- task_builder

resource "google_cloudfunctions2_function" "task_builder" {
  project     = var.project_id
  location    = var.region
  name        = "${var.name_prefix}-task-builder"
  description = "fedcompute task builder: validate config, DP and flex-ops checks, build and upload artifacts"

  build_config {
    runtime         = local.runtimes["task_builder"]
    entry_point     = "task_builder"
    service_account = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["task_builder"].name
      }
    }
  }

  service_config {
    available_memory                 = local.memory.task_builder
    available_cpu                    = local.cpu.task_builder
    timeout_seconds                  = var.task_builder_timeout_seconds
    min_instance_count               = local.min_instances.task_builder
    max_instance_count               = local.max_instances.task_builder
    max_instance_request_concurrency = local.concurrency.task_builder
    service_account_email            = google_service_account.task_builder.email
    ingress_settings                 = "ALLOW_ALL"
    all_traffic_on_latest_revision   = true
    environment_variables = merge(local.common_env, {
      FEDCOMPUTE_TASK_MANAGEMENT_URL = google_cloudfunctions2_function.task_management.url
    })

    secret_environment_variables {
      project_id = var.project_id
      key        = "FEDCOMPUTE_API_KEY"
      secret     = var.api_key_secret_id
      version    = "latest"
    }
  }

  depends_on = [google_project_iam_member.build_logs, google_project_iam_member.build_images, google_storage_bucket_iam_member.build_sources]
}

resource "google_storage_bucket_iam_member" "task_builder_model" {
  bucket = var.buckets.model
  role   = "roles/storage.objectAdmin" # reads uploaded SavedModels, writes the artifacts
  member = "serviceAccount:${google_service_account.task_builder.email}"
}

resource "google_cloud_run_service_iam_member" "task_builder_invokes_task_management" {
  project  = var.project_id
  location = var.region
  service  = google_cloudfunctions2_function.task_management.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.task_builder.email}"
}

# -------------------------------------------------------------------- task_management

resource "google_cloudfunctions2_function" "task_management" {
  project     = var.project_id
  location    = var.region
  name        = "${var.name_prefix}-task-management"
  description = "fedcompute task management: create, get, list, open, cancel tasks"

  build_config {
    runtime         = local.runtimes["task_management"]
    entry_point     = "task_management"
    service_account = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["task_management"].name
      }
    }
  }

  service_config {
    available_memory                 = local.memory.task_management
    available_cpu                    = local.cpu.task_management
    timeout_seconds                  = var.light_timeout_seconds
    min_instance_count               = local.min_instances.task_management
    max_instance_count               = local.max_instances.task_management
    max_instance_request_concurrency = local.concurrency.task_management
    service_account_email            = google_service_account.task_management.email
    ingress_settings                 = "ALLOW_ALL"
    all_traffic_on_latest_revision   = true
    environment_variables            = local.common_env

    secret_environment_variables {
      project_id = var.project_id
      key        = "FEDCOMPUTE_API_KEY"
      secret     = var.api_key_secret_id
      version    = "latest"
    }
  }

  depends_on = [google_project_iam_member.build_logs, google_project_iam_member.build_images, google_storage_bucket_iam_member.build_sources]
}

resource "google_project_iam_member" "task_management_datastore" {
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.task_management.email}"
}

resource "google_storage_bucket_iam_member" "task_management_model" {
  bucket = var.buckets.model
  role   = "roles/storage.objectUser" # read the server phase, delete an unopened task's artifacts
  member = "serviceAccount:${google_service_account.task_management.email}"
}

# -------------------------------------------------------------------- task_assignment

resource "google_cloudfunctions2_function" "task_assignment" {
  project     = var.project_id
  location    = var.region
  name        = "${var.name_prefix}-task-assignment"
  description = "fedcompute task assignment: device check-in and result reporting (public)"

  build_config {
    runtime         = local.runtimes["task_assignment"]
    entry_point     = "task_assignment"
    service_account = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["task_assignment"].name
      }
    }
  }

  service_config {
    available_memory                 = local.memory.task_assignment
    available_cpu                    = local.cpu.task_assignment
    timeout_seconds                  = var.light_timeout_seconds
    min_instance_count               = local.min_instances.task_assignment
    max_instance_count               = local.max_instances.task_assignment
    max_instance_request_concurrency = local.concurrency.task_assignment
    service_account_email            = google_service_account.task_assignment.email
    ingress_settings                 = "ALLOW_ALL"
    all_traffic_on_latest_revision   = true
    environment_variables            = local.common_env

    # The public upload key handed to devices in their assignment (issue 13).
    dynamic "secret_environment_variables" {
      for_each = var.upload_keys_configured ? [var.upload_public_keys_secret_id] : []
      content {
        project_id = var.project_id
        key        = "FEDCOMPUTE_UPLOAD_PUBLIC_KEYS"
        secret     = secret_environment_variables.value
        version    = "latest"
      }
    }
  }

  depends_on = [google_project_iam_member.build_logs, google_project_iam_member.build_images, google_storage_bucket_iam_member.build_sources]
}

resource "google_project_iam_member" "task_assignment_datastore" {
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.task_assignment.email}"
}

# Devices upload through resumable sessions created by this account: create, never read.
resource "google_storage_bucket_iam_member" "task_assignment_gradient" {
  bucket = var.buckets.gradient
  role   = "roles/storage.objectCreator"
  member = "serviceAccount:${google_service_account.task_assignment.email}"
}

# Signed download URLs for the plan and checkpoint.
resource "google_storage_bucket_iam_member" "task_assignment_model" {
  bucket = var.buckets.model
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.task_assignment.email}"
}

# V4 signing without a key file goes through iamcredentials signBlob on its own account.
resource "google_service_account_iam_member" "task_assignment_signs_as_itself" {
  service_account_id = google_service_account.task_assignment.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:${google_service_account.task_assignment.email}"
}

resource "google_cloud_run_service_iam_member" "task_assignment_public" {
  count = var.public_task_assignment ? 1 : 0

  project  = var.project_id
  location = var.region
  service  = google_cloudfunctions2_function.task_assignment.name
  role     = "roles/run.invoker"
  member   = "allUsers"
}

# ------------------------------------------------------------------- result_ingestion

# Eventarc storage triggers publish through Pub/Sub as the Cloud Storage service agent.
resource "google_project_iam_member" "gcs_agent_publishes_events" {
  project = var.project_id
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs_agent.email_address}"
}

resource "google_cloudfunctions2_function" "result_ingestion" {
  project     = var.project_id
  location    = var.region
  name        = "${var.name_prefix}-result-ingestion"
  description = "fedcompute result ingestion: count each finalized device upload once, publish round-ready"

  build_config {
    runtime         = local.runtimes["result_ingestion"]
    entry_point     = "result_ingestion"
    service_account = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["result_ingestion"].name
      }
    }
  }

  service_config {
    available_memory                 = local.memory.result_ingestion
    available_cpu                    = local.cpu.result_ingestion
    timeout_seconds                  = var.light_timeout_seconds
    min_instance_count               = local.min_instances.result_ingestion
    max_instance_count               = local.max_instances.result_ingestion
    max_instance_request_concurrency = local.concurrency.result_ingestion
    service_account_email            = google_service_account.result_ingestion.email
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    environment_variables            = local.common_env

    # HPKE private key ring (issue 13): only result_ingestion and aggregator open uploads.
    dynamic "secret_environment_variables" {
      for_each = var.upload_keys_configured ? [var.upload_keys_secret_id] : []
      content {
        project_id = var.project_id
        key        = "FEDCOMPUTE_UPLOAD_KEYS"
        secret     = secret_environment_variables.value
        version    = "latest"
      }
    }
  }

  event_trigger {
    trigger_region        = var.region
    event_type            = "google.cloud.storage.object.v1.finalized"
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.result_ingestion.email

    event_filters {
      attribute = "bucket"
      value     = var.buckets.gradient
    }
  }

  depends_on = [
    google_project_iam_member.build_logs,
    google_project_iam_member.build_images,
    google_storage_bucket_iam_member.build_sources,
    google_project_iam_member.gcs_agent_publishes_events,
    google_project_iam_member.result_ingestion_event_receiver,
  ]
}

resource "google_project_iam_member" "result_ingestion_datastore" {
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.result_ingestion.email}"
}

resource "google_storage_bucket_iam_member" "result_ingestion_gradient" {
  bucket = var.buckets.gradient
  role   = "roles/storage.objectViewer" # read and validate the update
  member = "serviceAccount:${google_service_account.result_ingestion.email}"
}

resource "google_pubsub_topic_iam_member" "result_ingestion_round_ready" {
  project = var.project_id
  topic   = local.round_ready_topic
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.result_ingestion.email}"
}

# The function's account is also the Eventarc trigger's identity.
resource "google_project_iam_member" "result_ingestion_event_receiver" {
  project = var.project_id
  role    = "roles/eventarc.eventReceiver"
  member  = "serviceAccount:${google_service_account.result_ingestion.email}"
}

resource "google_cloud_run_service_iam_member" "result_ingestion_trigger_invoker" {
  project  = var.project_id
  location = var.region
  service  = google_cloudfunctions2_function.result_ingestion.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.result_ingestion.email}"
}

# ------------------------------------------------------------------------- aggregator

# Pushed by the round-ready subscription (modules/pubsub), not by an Eventarc trigger:
# the subscription carries the dead-letter policy, and an HTTP-invoked function may run
# up to 3600 s where event-triggered ones stop at 540 s.
resource "google_cloudfunctions2_function" "aggregator" {
  project     = var.project_id
  location    = var.region
  name        = "${var.name_prefix}-aggregator"
  description = "fedcompute aggregator: clip, sum, noise, server optimizer step (Pub/Sub round-ready)"

  build_config {
    runtime         = local.runtimes["aggregator"]
    entry_point     = "aggregator"
    service_account = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["aggregator"].name
      }
    }
  }

  service_config {
    available_memory                 = local.memory.aggregator
    available_cpu                    = local.cpu.aggregator
    timeout_seconds                  = var.aggregator_timeout_seconds
    min_instance_count               = local.min_instances.aggregator
    max_instance_count               = local.max_instances.aggregator
    max_instance_request_concurrency = local.concurrency.aggregator
    service_account_email            = google_service_account.aggregator.email
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    # A round is split in at most as many shards as instances may run at once.
    environment_variables = merge(local.common_env, {
      FEDCOMPUTE_MAX_AGGREGATION_SHARDS = tostring(local.max_instances.aggregator)
    })

    # HPKE private key ring (issue 13): only result_ingestion and aggregator open uploads.
    dynamic "secret_environment_variables" {
      for_each = var.upload_keys_configured ? [var.upload_keys_secret_id] : []
      content {
        project_id = var.project_id
        key        = "FEDCOMPUTE_UPLOAD_KEYS"
        secret     = secret_environment_variables.value
        version    = "latest"
      }
    }
  }

  depends_on = [google_project_iam_member.build_logs, google_project_iam_member.build_images, google_storage_bucket_iam_member.build_sources]
}

resource "google_project_iam_member" "aggregator_datastore" {
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.aggregator.email}"
}

resource "google_storage_bucket_iam_member" "aggregator_gradient" {
  bucket = var.buckets.gradient
  role   = "roles/storage.objectViewer" # stream the round's updates
  member = "serviceAccount:${google_service_account.aggregator.email}"
}

resource "google_storage_bucket_iam_member" "aggregator_model" {
  bucket = var.buckets.model
  role   = "roles/storage.objectUser" # read the previous checkpoint, write the new one and the metrics
  member = "serviceAccount:${google_service_account.aggregator.email}"
}

resource "google_storage_bucket_iam_member" "aggregator_aggregate" {
  bucket = var.buckets.aggregate
  role   = "roles/storage.objectUser" # intermediate aggregates
  member = "serviceAccount:${google_service_account.aggregator.email}"
}

resource "google_pubsub_topic_iam_member" "aggregator_round_completed" {
  project = var.project_id
  topic   = local.round_completed_topic
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.aggregator.email}"
}

resource "google_pubsub_topic_iam_member" "aggregator_round_ready" {
  project = var.project_id
  topic   = local.round_ready_topic
  role    = "roles/pubsub.publisher" # the last shard of a round triggers its combine
  member  = "serviceAccount:${google_service_account.aggregator.email}"
}

resource "google_pubsub_topic_iam_member" "aggregator_aggregation_shard" {
  project = var.project_id
  topic   = local.aggregation_shard_topic
  role    = "roles/pubsub.publisher" # fans a big round out to its shards
  member  = "serviceAccount:${google_service_account.aggregator.email}"
}

resource "google_cloud_run_service_iam_member" "push_invokes_aggregator" {
  project  = var.project_id
  location = var.region
  service  = google_cloudfunctions2_function.aggregator.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.push.email}"
}

# -------------------------------------------------------------------------- scheduler

# Pushed by the scheduler-tick subscription (modules/pubsub), fed by Cloud Scheduler.
resource "google_cloudfunctions2_function" "scheduler" {
  project     = var.project_id
  location    = var.region
  name        = "${var.name_prefix}-scheduler"
  description = "fedcompute scheduler: timeouts, stuck rounds, eval iterations (Pub/Sub scheduler-tick)"

  build_config {
    runtime         = local.runtimes["scheduler"]
    entry_point     = "scheduler"
    service_account = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["scheduler"].name
      }
    }
  }

  service_config {
    available_memory                 = local.memory.scheduler
    available_cpu                    = local.cpu.scheduler
    timeout_seconds                  = var.light_timeout_seconds
    min_instance_count               = local.min_instances.scheduler
    max_instance_count               = local.max_instances.scheduler
    max_instance_request_concurrency = local.concurrency.scheduler
    service_account_email            = google_service_account.scheduler.email
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    environment_variables            = local.common_env
  }

  depends_on = [google_project_iam_member.build_logs, google_project_iam_member.build_images, google_storage_bucket_iam_member.build_sources]
}

resource "google_project_iam_member" "scheduler_datastore" {
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.scheduler.email}"
}

resource "google_pubsub_topic_iam_member" "scheduler_round_ready" {
  project = var.project_id
  topic   = local.round_ready_topic
  role    = "roles/pubsub.publisher" # re-publishes stuck rounds
  member  = "serviceAccount:${google_service_account.scheduler.email}"
}

resource "google_cloud_run_service_iam_member" "push_invokes_scheduler" {
  project  = var.project_id
  location = var.region
  service  = google_cloudfunctions2_function.scheduler.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.push.email}"
}

# -------------------------------------------------------------------------- dashboard

# Operator-facing monitoring page: read-only, authenticated (no allUsers invoker).
resource "google_cloudfunctions2_function" "dashboard" {
  project     = var.project_id
  location    = var.region
  name        = "${var.name_prefix}-dashboard"
  description = "fedcompute monitoring dashboard: tasks, metrics per round, operations (read-only)"

  build_config {
    runtime         = local.runtimes["dashboard"]
    entry_point     = "dashboard"
    service_account = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["dashboard"].name
      }
    }
  }

  service_config {
    available_memory                 = local.memory.dashboard
    available_cpu                    = local.cpu.dashboard
    timeout_seconds                  = var.light_timeout_seconds
    min_instance_count               = local.min_instances.dashboard
    max_instance_count               = local.max_instances.dashboard
    max_instance_request_concurrency = local.concurrency.dashboard
    service_account_email            = google_service_account.dashboard.email
    ingress_settings                 = "ALLOW_ALL"
    all_traffic_on_latest_revision   = true
    environment_variables            = local.common_env

    secret_environment_variables {
      project_id = var.project_id
      key        = "FEDCOMPUTE_API_KEY"
      secret     = var.api_key_secret_id
      version    = "latest"
    }
  }

  depends_on = [google_project_iam_member.build_logs, google_project_iam_member.build_images, google_storage_bucket_iam_member.build_sources]
}

resource "google_project_iam_member" "dashboard_datastore" {
  project = var.project_id
  role    = "roles/datastore.viewer" # reads task, round and assignment records only
  member  = "serviceAccount:${google_service_account.dashboard.email}"
}

resource "google_storage_bucket_iam_member" "dashboard_model" {
  bucket = var.buckets.model
  role   = "roles/storage.objectViewer" # the rounds' metrics JSON
  member = "serviceAccount:${google_service_account.dashboard.email}"
}
