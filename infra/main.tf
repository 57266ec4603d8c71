# fedcompute on Google Cloud: buckets, Pub/Sub, Firestore, the six Cloud Functions, the
# Cloud Scheduler tick and the API-key secret. See README.md in this folder.

locals {
  buckets = {
    model     = coalesce(var.model_bucket, "${var.project_id}-fcp-model")
    gradient  = coalesce(var.gradient_bucket, "${var.project_id}-fcp-gradient")
    aggregate = coalesce(var.aggregate_bucket, "${var.project_id}-fcp-aggregate")
  }
  # Topic names are fixed by the code (fedcompute.settings.Topics); gcs-object-finalize is
  # local-only (Eventarc delivers storage events directly in the cloud).
  topics = {
    round_ready     = "round-ready"
    round_completed = "round-completed"
    scheduler_tick  = "scheduler-tick"
    # Sharded aggregation: one message per shard of a big round, pushed to the aggregator.
    aggregation_shard = "aggregation-shard"
  }
  source_dir = abspath(startswith(var.functions_source_dir, "/") ? var.functions_source_dir : "${path.root}/${var.functions_source_dir}")
}

resource "google_project_service" "apis" {
  for_each = toset([
    "cloudfunctions.googleapis.com",
    "run.googleapis.com",
    "cloudbuild.googleapis.com",
    "artifactregistry.googleapis.com",
    "eventarc.googleapis.com",
    "pubsub.googleapis.com",
    "storage.googleapis.com",
    "firestore.googleapis.com",
    "cloudscheduler.googleapis.com",
    "secretmanager.googleapis.com",
    "iam.googleapis.com",
    "iamcredentials.googleapis.com", # signBlob: V4 signed URLs without a key file
    "logging.googleapis.com",
  ])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

data "google_project" "this" {
  project_id = var.project_id
  depends_on = [google_project_service.apis]
}

module "storage" {
  source = "./modules/storage"

  project_id               = var.project_id
  region                   = var.region
  buckets                  = local.buckets
  gradient_retention_days  = var.gradient_retention_days
  aggregate_retention_days = var.aggregate_retention_days

  depends_on = [google_project_service.apis]
}

module "firestore" {
  source = "./modules/firestore"

  project_id = var.project_id
  location   = coalesce(var.firestore_location, var.region)

  depends_on = [google_project_service.apis]
}

module "pubsub" {
  source = "./modules/pubsub"

  project_id     = var.project_id
  project_number = data.google_project.this.number
  topics         = values(local.topics)
  dead_letter_replayers = {
    scheduler = { topic = local.topics.round_ready, email = module.functions.service_account_emails.scheduler }
  }
  # The Pub/Sub-driven functions are pushed by these subscriptions (explicit dead-letter
  # policy). The aggregator's stages (one shard, or the combine) must each finish inside
  # the ack deadline (600 s, Pub/Sub's maximum) or the message is re-delivered while it
  # runs: the function's timeout is the same 600 s by default, and the shard count
  # (fedcompute.learning.sharding) keeps a stage at ~10-60 s.
  push_subscriptions = {
    "aggregator-round-ready" = {
      topic                      = local.topics.round_ready
      push_endpoint              = module.functions.urls.aggregator
      oidc_service_account_email = module.functions.push_service_account_email
      ack_deadline_seconds       = 600
    }
    "aggregator-aggregation-shard" = {
      topic                      = local.topics.aggregation_shard
      push_endpoint              = module.functions.urls.aggregator
      oidc_service_account_email = module.functions.push_service_account_email
      ack_deadline_seconds       = 600
    }
    "scheduler-scheduler-tick" = {
      topic                      = local.topics.scheduler_tick
      push_endpoint              = module.functions.urls.scheduler
      oidc_service_account_email = module.functions.push_service_account_email
      ack_deadline_seconds       = 60
    }
  }
  # Nobody in the pipeline consumes round-completed; this subscription keeps the events
  # for operators and dashboards (`gcloud pubsub subscriptions pull round-completed-monitor`).
  pull_subscriptions = {
    "round-completed-monitor" = {
      topic = local.topics.round_completed
    }
  }

  depends_on = [google_project_service.apis]
}

module "secrets" {
  source = "./modules/secrets"

  project_id = var.project_id
  accessors = {
    task_builder    = module.functions.service_account_emails.task_builder
    task_management = module.functions.service_account_emails.task_management
    dashboard       = module.functions.service_account_emails.dashboard
  }

  depends_on = [google_project_service.apis]
}

module "upload_keys" {
  source = "./modules/upload_keys"

  project_id = var.project_id
  key_dir    = var.upload_keys_dir
  private_accessors = {
    result_ingestion = module.functions.service_account_emails.result_ingestion
    aggregator       = module.functions.service_account_emails.aggregator
  }
  public_accessors = {
    task_assignment = module.functions.service_account_emails.task_assignment
  }

  depends_on = [google_project_service.apis]
}

module "functions" {
  source = "./modules/functions"

  project_id                   = var.project_id
  region                       = var.region
  name_prefix                  = var.name_prefix
  source_dir                   = local.source_dir
  buckets                      = module.storage.bucket_names
  topic_ids                    = module.pubsub.topic_ids
  api_key_secret_id            = module.secrets.api_key_secret_id
  upload_keys_secret_id        = module.upload_keys.upload_keys_secret_id
  upload_public_keys_secret_id = module.upload_keys.upload_public_keys_secret_id
  upload_keys_configured       = module.upload_keys.configured
  light_memory                 = var.light_memory
  light_timeout_seconds        = var.light_timeout_seconds
  task_builder_memory          = var.task_builder_memory
  task_builder_timeout_seconds = var.task_builder_timeout_seconds
  aggregator_memory            = var.aggregator_memory
  aggregator_timeout_seconds   = var.aggregator_timeout_seconds
  min_instances                = var.min_instances
  max_instances                = var.max_instances
  public_task_assignment       = var.public_task_assignment

  depends_on = [google_project_service.apis, module.firestore]
}

module "scheduler" {
  source = "./modules/scheduler"

  project_id = var.project_id
  region     = var.region
  topic_id   = module.pubsub.topic_ids[local.topics.scheduler_tick]
  schedule   = var.scheduler_cron

  depends_on = [google_project_service.apis]
}
