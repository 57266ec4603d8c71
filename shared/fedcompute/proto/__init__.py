"""fedcompute's protobuf schemas (ODP Federated Compute wire format) and generated code.

The ``.proto`` files in this folder use the field names, numbers and enum values of
Android ODP's federated-compute server and client, so a real ODP client or ODP tooling can
talk to fedcompute. Field numbers >= 100 are fedcompute extensions (documented in the
``.proto`` comments); an ODP peer ignores them as unknown fields.

Modules (regenerate with ``make proto`` after editing a ``.proto``):

- ``common_pb2``          package google.internal.federatedcompute.v1 (Resource, RejectionInfo, ...)
- ``eligibility_pb2``     package google.internal.federated.plan (EligibilityTaskInfo, policies)
- ``task_assignment_pb2`` device check-in and result reporting messages
- ``task_management_pb2`` Task, TaskInfo, CreateTaskRequest/Response, GetTaskByIdResponse
- ``task_config_pb2``     TaskConfig, the task builder's input (text format in the seed)
- ``task_builder_pb2``    BuildTaskRequest/Response, TaskReport

Importing this package imports nothing; import the ``*_pb2`` module you need.
"""
