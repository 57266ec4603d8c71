output "topic_ids" {
  description = "Topic ids (projects/<p>/topics/<name>) by topic name."
  value       = { for name, t in google_pubsub_topic.topic : name => t.id }
}

output "topic_names" {
  description = "Topic names."
  value       = sort([for t in google_pubsub_topic.topic : t.name])
}

output "dead_letter_topic_names" {
  description = "Dead-letter topic names."
  value       = sort([for t in google_pubsub_topic.dead_letter : t.name])
}

output "subscription_names" {
  description = "Every subscription's name."
  value = sort(concat(
    [for s in google_pubsub_subscription.push : s.name],
    [for s in google_pubsub_subscription.pull : s.name],
    [for s in google_pubsub_subscription.dead_letter_inspect : s.name],
  ))
}
