# Topics, their dead-letter topics and the subscriptions. Every subscription on a work
# topic retries with exponential backoff and dead-letters after max_delivery_attempts;
# every dead-letter topic has an "-inspect" pull subscription so poisoned messages are
# kept (a topic without subscriptions drops what is published to it).

locals {
  pubsub_agent = "serviceAccount:service-${var.project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  all_subscriptions = merge(
    { for name, s in var.push_subscriptions : name => s.topic },
    { for name, s in var.pull_subscriptions : name => s.topic },
  )
}

resource "google_pubsub_topic" "topic" {
  for_each = toset(var.topics)

  project                    = var.project_id
  name                       = each.value
  message_retention_duration = "86400s"
}

resource "google_pubsub_topic" "dead_letter" {
  for_each = toset(var.topics)

  project                    = var.project_id
  name                       = "${each.value}-dead-letter"
  message_retention_duration = "604800s"
}

resource "google_pubsub_subscription" "dead_letter_inspect" {
  for_each = toset(var.topics)

  project                    = var.project_id
  name                       = "${each.value}-dead-letter-inspect"
  topic                      = google_pubsub_topic.dead_letter[each.value].id
  message_retention_duration = "604800s"
  ack_deadline_seconds       = 60

  expiration_policy {
    ttl = "" # never expires
  }
}

resource "google_pubsub_subscription" "push" {
  for_each = var.push_subscriptions

  project              = var.project_id
  name                 = each.key
  topic                = google_pubsub_topic.topic[each.value.topic].id
  ack_deadline_seconds = each.value.ack_deadline_seconds

  push_config {
    push_endpoint = each.value.push_endpoint

    oidc_token {
      service_account_email = each.value.oidc_service_account_email
      audience              = each.value.push_endpoint
    }
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter[each.value.topic].id
    max_delivery_attempts = var.max_delivery_attempts
  }

  retry_policy {
    minimum_backoff = var.minimum_backoff
    maximum_backoff = var.maximum_backoff
  }

  expiration_policy {
    ttl = ""
  }
}

resource "google_pubsub_subscription" "pull" {
  for_each = var.pull_subscriptions

  project                    = var.project_id
  name                       = each.key
  topic                      = google_pubsub_topic.topic[each.value.topic].id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter[each.value.topic].id
    max_delivery_attempts = var.max_delivery_attempts
  }

  retry_policy {
    minimum_backoff = var.minimum_backoff
    maximum_backoff = var.maximum_backoff
  }

  expiration_policy {
    ttl = ""
  }
}

# Dead-lettering is done by the Pub/Sub service agent: it must publish to the dead-letter
# topics and acknowledge (subscribe to) the source subscriptions.
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  for_each = toset(var.topics)

  project = var.project_id
  topic   = google_pubsub_topic.dead_letter[each.value].name
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = local.all_subscriptions

  project      = var.project_id
  subscription = each.key
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent

  depends_on = [google_pubsub_subscription.push, google_pubsub_subscription.pull]
}

# Pub/Sub mints the OIDC tokens of authenticated pushes as the push service account.
resource "google_service_account_iam_member" "push_token_creator" {
  for_each = toset([for s in var.push_subscriptions : s.oidc_service_account_email])

  service_account_id = "projects/${var.project_id}/serviceAccounts/${each.value}"
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent
}

# The scheduler replays dead-lettered round-ready messages (issue 13): it pulls them from the
# dead-letter topic's "-inspect" subscription and publishes them again on their topic.
resource "google_pubsub_subscription_iam_member" "dead_letter_replayer" {
  for_each = var.dead_letter_replayers

  project      = var.project_id
  subscription = google_pubsub_subscription.dead_letter_inspect[each.value.topic].name
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${each.value.email}"
}
