"""The Terraform under infra/ deploys what the code needs, with least-privilege IAM.

Parsed with python-hcl2 (terraform cannot download providers here, so `terraform validate`
cannot run); `terraform fmt -check` runs for real.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
FUNCTIONS = sorted(p.parent.name for p in (ROOT / "functions").glob("*/main.py"))
HTTP_FUNCTIONS = {"task_builder", "task_management", "task_assignment", "dashboard"}
# Pub/Sub-driven functions: pushed by one subscription on each of these topics (dead-letter policy on it).
PUSHED_BY_TOPIC = {"aggregator": ("round-ready", "aggregation-shard"), "scheduler": ("scheduler-tick",)}
# Only roles that cannot be scoped to a resource may be granted on the project.
PROJECT_ROLES_ALLOWED = {"roles/datastore.user", "roles/datastore.viewer", "roles/eventarc.eventReceiver", "roles/logging.logWriter",
                         "roles/artifactregistry.writer", "roles/pubsub.publisher"}
FORBIDDEN_ROLES = {"roles/owner", "roles/editor", "roles/viewer", "roles/storage.admin", "roles/pubsub.admin",
                   "roles/datastore.owner", "roles/iam.serviceAccountUser", "roles/secretmanager.admin"}
# Exactly the grants each function's account gets: (resource type, role, target).
EXPECTED_GRANTS: dict[str, set[tuple[str, str, str]]] = {
    "task_assignment": {
        ("project", "roles/datastore.user", "project"),
        ("bucket", "roles/storage.objectCreator", "gradient"),
        ("bucket", "roles/storage.objectViewer", "model"),
        ("service_account", "roles/iam.serviceAccountTokenCreator", "task_assignment"),
        ("secret", "roles/secretmanager.secretAccessor", "upload_public_keys"),
    },
    "task_management": {
        ("project", "roles/datastore.user", "project"),
        ("bucket", "roles/storage.objectUser", "model"),
        ("secret", "roles/secretmanager.secretAccessor", "api_key"),
    },
    "task_builder": {
        ("bucket", "roles/storage.objectAdmin", "model"),
        ("run_service", "roles/run.invoker", "task_management"),
        ("secret", "roles/secretmanager.secretAccessor", "api_key"),
    },
    "result_ingestion": {
        ("project", "roles/datastore.user", "project"),
        ("project", "roles/eventarc.eventReceiver", "project"),
        ("bucket", "roles/storage.objectViewer", "gradient"),
        ("topic", "roles/pubsub.publisher", "round-ready"),
        ("run_service", "roles/run.invoker", "result_ingestion"),
        ("secret", "roles/secretmanager.secretAccessor", "upload_keys"),
    },
    "aggregator": {
        ("project", "roles/datastore.user", "project"),
        ("bucket", "roles/storage.objectViewer", "gradient"),
        ("bucket", "roles/storage.objectUser", "model"),
        ("bucket", "roles/storage.objectUser", "aggregate"),
        ("topic", "roles/pubsub.publisher", "round-completed"),
        ("topic", "roles/pubsub.publisher", "round-ready"),
        ("topic", "roles/pubsub.publisher", "aggregation-shard"),
        ("secret", "roles/secretmanager.secretAccessor", "upload_keys"),
    },
    "scheduler": {
        ("project", "roles/datastore.user", "project"),
        ("topic", "roles/pubsub.publisher", "round-ready"),
        ("subscription", "roles/pubsub.subscriber", "round-ready-dead-letter-inspect"),
    },
    "dashboard": {
        ("project", "roles/datastore.viewer", "project"),
        ("bucket", "roles/storage.objectViewer", "model"),
        ("secret", "roles/secretmanager.secretAccessor", "api_key"),
    },
}
READ_ROLES = {"roles/storage.objectViewer", "roles/storage.objectUser", "roles/storage.objectAdmin",
              "roles/storage.admin", "roles/storage.legacyObjectReader", "roles/storage.legacyBucketReader"}


def unquote(value: Any) -> Any:
    """hcl2 keeps string quotes and wraps expressions in ${...}; strip both layers of noise."""
    if isinstance(value, str):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            return value[1:-1]
        return value
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if k not in ("__is_block__", "__comments__")}
    if isinstance(value, list):
        return [unquote(v) for v in value]
    return value


@dataclass
class Module:
    path: Path
    resources: dict[tuple[str, str], dict[str, Any]]
    variables: dict[str, dict[str, Any]]
    locals: dict[str, Any]
    modules: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]

    def var_default(self, expression: Any) -> Any:
        """`${var.x}` -> the variable's default (other values pass through)."""
        if isinstance(expression, str):
            match = re.fullmatch(r"\$\{var\.(\w+)\}", expression)
            if match:
                return self.variables[match.group(1)].get("default")
        return expression

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: body for (k, name), body in self.resources.items() if k == kind}


def load_module(folder: Path) -> Module:
    module = Module(folder, {}, {}, {}, {}, {})
    for tf in sorted(folder.glob("*.tf")):
        with tf.open() as handle:
            data = unquote(hcl2.load(handle))
        for block in data.get("resource", []):
            for kind, named in block.items():
                for name, body in named.items():
                    assert (kind, name) not in module.resources, f"{kind}.{name} declared twice in {folder}"
                    module.resources[(kind, name)] = body
        for block in data.get("variable", []):
            module.variables.update(block)
        for block in data.get("locals", []):
            module.locals.update(block)
        for block in data.get("module", []):
            module.modules.update(block)
        for block in data.get("output", []):
            module.outputs.update(block)
    return module


@pytest.fixture(scope="module")
def root() -> Module:
    return load_module(INFRA)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return {p.name: load_module(p) for p in sorted((INFRA / "modules").iterdir()) if p.is_dir()}


def catalogue_json() -> dict[str, dict[str, Any]]:
    """What modules/functions reads per function (generated from fedcompute.catalogue)."""
    import json

    from fedcompute.deploy.catalogue import CATALOGUE_JSON

    return json.loads((ROOT / CATALOGUE_JSON).read_text())


def all_tf_files() -> list[Path]:
    return sorted(INFRA.glob("*.tf")) + sorted((INFRA / "modules").glob("**/*.tf"))


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The single nested block ``name`` of a resource body."""
    blocks = body.get(name)
    assert isinstance(blocks, list) and len(blocks) == 1, f"expected one {name} block, got {blocks!r}"
    return blocks[0]


def sa_of(member: str) -> str | None:
    match = re.fullmatch(r"serviceAccount:\$\{google_service_account\.(\w+)\.email\}", member)
    return match.group(1) if match else None


def grants(functions_module: Module, secrets_module: Module, root: Module) -> dict[str, set[tuple[str, str, str]]]:
    """Every IAM grant to a function's account, as (kind, role, target)."""
    buckets = {"${var.buckets.model}": "model", "${var.buckets.gradient}": "gradient",
               "${var.buckets.aggregate}": "aggregate"}
    topics = {"${local.round_ready_topic}": "round-ready", "${local.round_completed_topic}": "round-completed",
              "${local.aggregation_shard_topic}": "aggregation-shard"}
    result: dict[str, set[tuple[str, str, str]]] = {}

    def add(member: str, entry: tuple[str, str, str]) -> None:
        account = sa_of(member)
        if account is not None:
            result.setdefault(account, set()).add(entry)

    for body in functions_module.of_type("google_project_iam_member").values():
        add(body["member"], ("project", body["role"], "project"))
    for body in functions_module.of_type("google_storage_bucket_iam_member").values():
        add(body["member"], ("bucket", body["role"], buckets.get(body["bucket"], body["bucket"])))
    for body in functions_module.of_type("google_pubsub_topic_iam_member").values():
        add(body["member"], ("topic", body["role"], topics.get(body["topic"], body["topic"])))
    for body in functions_module.of_type("google_cloud_run_service_iam_member").values():
        match = re.fullmatch(r"\$\{google_cloudfunctions2_function\.(\w+)\.name\}", body["service"])
        assert match, f"run invoker on an unexpected service {body['service']}"
        add(body["member"], ("run_service", body["role"], match.group(1)))
    for body in functions_module.of_type("google_service_account_iam_member").values():
        match = re.fullmatch(r"\$\{google_service_account\.(\w+)\.name\}", body["service_account_id"])
        assert match
        add(body["member"], ("service_account", body["role"], match.group(1)))
    # Secret accessors: the root passes function accounts to modules/secrets.
    accessors = root.modules["secrets"]["accessors"]
    assert set(secrets_module.of_type("google_secret_manager_secret_iam_member")) == {"accessor"}
    accessor = secrets_module.of_type("google_secret_manager_secret_iam_member")["accessor"]
    assert accessor["role"] == "roles/secretmanager.secretAccessor"
    assert accessor["for_each"] == "${var.accessors}"
    for function, email in accessors.items():
        assert email == f"${{module.functions.service_account_emails.{function}}}"
        result.setdefault(function, set()).add(("secret", "roles/secretmanager.secretAccessor", "api_key"))
    # Dead-letter replay: modules/pubsub lets the scheduler pull a topic's dead letters.
    for function, spec in root.modules["pubsub"].get("dead_letter_replayers", {}).items():
        assert spec["email"] == f"${{module.functions.service_account_emails.{function}}}"
        topic = {"${local.topics.round_ready}": "round-ready"}[spec["topic"]]
        result.setdefault(function, set()).add(("subscription", "roles/pubsub.subscriber",
                                                f"{topic}-dead-letter-inspect"))
    # HPKE upload keys: modules/upload_keys grants the private ring and the public keys separately.
    upload = root.modules["upload_keys"]
    for kind, secret in (("private_accessors", "upload_keys"), ("public_accessors", "upload_public_keys")):
        for function, email in upload[kind].items():
            assert email == f"${{module.functions.service_account_emails.{function}}}"
            result.setdefault(function, set()).add(("secret", "roles/secretmanager.secretAccessor", secret))
    return result


def test_every_tf_file_parses_and_modules_exist(root: Module, modules: dict[str, Module]) -> None:
    assert {"storage", "pubsub", "firestore", "functions", "scheduler", "secrets", "upload_keys"} <= set(modules)
    for name, call in root.modules.items():
        assert call["source"] == f"./modules/{name}"
        # Every argument the root passes is a declared variable of the module.
        passed = set(call) - {"source", "depends_on"}
        assert passed <= set(modules[name].variables), f"module {name}: undeclared {passed - set(modules[name].variables)}"
        required = {v for v, spec in modules[name].variables.items() if "default" not in spec}
        assert required <= passed, f"module {name} misses required variables {required - passed}"
    assert len(all_tf_files()) >= 20


def test_variables_have_descriptions_and_validations(root: Module, modules: dict[str, Module]) -> None:
    for module in [root, *modules.values()]:
        for name, spec in module.variables.items():
            assert spec.get("description"), f"{module.path.name}: variable {name} has no description"
    for name in ("project_id", "region", "light_memory", "task_builder_memory", "aggregator_memory",
                 "min_instances", "max_instances", "gradient_retention_days"):
        assert root.variables[name].get("validation"), f"variable {name} has no validation block"
    project_rule = root.variables["project_id"]["validation"][0]["condition"]
    pattern = re.search(r'regex\("(.+?)", var\.project_id\)', project_rule).group(1).replace("\\\\", "\\")
    assert re.fullmatch(pattern, "my-fedcompute-project") and not re.fullmatch(pattern, "My_Project")
    assert root.variables["gradient_retention_days"]["default"] == 1


def test_outputs_expose_the_user_endpoints(root: Module) -> None:
    for name in ("task_builder_url", "task_management_url", "task_assignment_url", "model_bucket", "gradient_bucket",
                 "aggregate_bucket", "topics"):
        assert name in root.outputs and root.outputs[name].get("description"), name
    assert root.outputs["task_assignment_url"]["value"] == "${module.functions.urls.task_assignment}"


def test_apis_are_enabled(root: Module) -> None:
    apis = root.resources[("google_project_service", "apis")]["for_each"]
    for api in ("cloudfunctions", "run", "cloudbuild", "eventarc", "pubsub", "firestore", "cloudscheduler",
                "secretmanager", "iamcredentials"):
        assert f"{api}.googleapis.com" in apis


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_resource_entry_point_trigger_and_sizing(function: str, modules: dict[str, Module],
                                                          root: Module) -> None:
    fm = modules["functions"]
    body = fm.of_type("google_cloudfunctions2_function").get(function)
    assert body is not None, f"no google_cloudfunctions2_function.{function} for functions/{function}"
    build = block(body, "build_config")
    from fedcompute.deploy.package import FUNCTIONS as PACKAGED

    assert build["entry_point"] == function and build["runtime"] == f'${{local.runtimes["{function}"]}}'
    assert catalogue_json()[function]["runtime"] == PACKAGED[function].runtime  # the runtime its lock targets
    source = block(block(build, "source"), "storage_source")
    assert source["object"] == f'${{google_storage_bucket_object.source["{function}"].name}}'
    service = block(body, "service_config")
    assert service["service_account_email"] == f"${{google_service_account.{function}.email}}"
    assert (("google_service_account", function)) in fm.resources

    memory = fm.var_default(fm.locals["memory"][function])
    timeout = fm.var_default(service["timeout_seconds"])
    expected = {"task_builder": ("8Gi", 900), "aggregator": ("16Gi", 600)}.get(function, ("512Mi", 60))
    assert (memory, timeout) == expected
    # The root's defaults agree with the module's.
    assert root.variables[{"task_builder": "task_builder_memory", "aggregator": "aggregator_memory"}
                          .get(function, "light_memory")]["default"] == expected[0]

    if function in HTTP_FUNCTIONS or function in PUSHED_BY_TOPIC:
        assert "event_trigger" not in body, f"{function} is invoked over HTTPS"
    if function == "result_ingestion":
        trigger = block(body, "event_trigger")
        assert trigger["event_type"] == "google.cloud.storage.object.v1.finalized"
        assert trigger["retry_policy"] == "RETRY_POLICY_RETRY"
        assert block(trigger, "event_filters") == {"attribute": "bucket", "value": "${var.buckets.gradient}"}
    if function in PUSHED_BY_TOPIC:
        subs = root.modules["pubsub"]["push_subscriptions"]
        topics = root.locals["topics"]
        mine = [s for s in subs.values() if s["push_endpoint"] == f"${{module.functions.urls.{function}}}"]
        pushed = sorted(topics[re.fullmatch(r"\$\{local\.topics\.(\w+)\}", s["topic"]).group(1)] for s in mine)
        assert pushed == sorted(PUSHED_BY_TOPIC[function]), f"{function}: one subscription per topic"
        assert fm.outputs["urls"]["value"][function] == f"${{google_cloudfunctions2_function.{function}.url}}"
        invokers = [b for b in fm.of_type("google_cloud_run_service_iam_member").values()
                    if b["service"] == f"${{google_cloudfunctions2_function.{function}.name}}"]
        assert [(b["role"], b["member"]) for b in invokers] == [
            ("roles/run.invoker", "serviceAccount:${google_service_account.push.email}")]
        assert all(s["oidc_service_account_email"] == "${module.functions.push_service_account_email}" for s in mine)
        assert fm.outputs["push_service_account_email"]["value"] == "${google_service_account.push.email}"


def test_push_subscription_ack_deadline_and_aggregator_timeout(root: Module) -> None:
    subs = root.modules["pubsub"]["push_subscriptions"]
    assert all(10 <= s["ack_deadline_seconds"] <= 600 for s in subs.values())
    # Each aggregator stage (a shard or the combine) is stopped when Pub/Sub would re-deliver it.
    aggregator = [s for s in subs.values() if s["push_endpoint"] == "${module.functions.urls.aggregator}"]
    assert {s["ack_deadline_seconds"] for s in aggregator} == {root.variables["aggregator_timeout_seconds"]["default"]}


def test_secrets_are_injected_only_into_api_key_functions(modules: dict[str, Module]) -> None:
    for function, body in modules["functions"].of_type("google_cloudfunctions2_function").items():
        secrets = block(body, "service_config").get("secret_environment_variables", [])
        if function in ("task_builder", "task_management", "dashboard"):
            assert [(s["key"], s["secret"]) for s in secrets] == [("FEDCOMPUTE_API_KEY", "${var.api_key_secret_id}")]
        else:
            assert secrets == [], f"{function} must not see the API key"


def test_only_ingestion_and_aggregator_see_the_private_upload_keys(modules: dict[str, Module]) -> None:
    mounted = {}
    for function, body in modules["functions"].of_type("google_cloudfunctions2_function").items():
        dynamic = block(body, "service_config").get("dynamic", [])
        mounted[function] = sorted(d["secret_environment_variables"]["content"][0]["key"] for d in dynamic
                                   if "secret_environment_variables" in d)
    assert mounted == {f: [] for f in mounted} | {"result_ingestion": ["FEDCOMPUTE_UPLOAD_KEYS"],
                                                  "aggregator": ["FEDCOMPUTE_UPLOAD_KEYS"],
                                                  "task_assignment": ["FEDCOMPUTE_UPLOAD_PUBLIC_KEYS"]}
    resources = modules["upload_keys"].of_type("google_secret_manager_secret_iam_member")
    assert resources["private_accessor"]["secret_id"] == "${google_secret_manager_secret.upload_keys.secret_id}"
    assert resources["public_accessor"]["secret_id"] == "${google_secret_manager_secret.upload_public_keys.secret_id}"


def test_only_task_assignment_is_public(modules: dict[str, Module]) -> None:
    fm = modules["functions"]
    public = []
    for kind in ("google_cloud_run_service_iam_member", "google_cloudfunctions2_function_iam_member"):
        for body in fm.of_type(kind).values():
            if body["member"] in ("allUsers", "allAuthenticatedUsers"):
                public.append(body["service"])
    assert public == ["${google_cloudfunctions2_function.task_assignment.name}"]
    for function in set(FUNCTIONS) - {"task_assignment"}:
        assert not any(b.get("member") in ("allUsers", "allAuthenticatedUsers") for b in fm.resources.values()
                       if function in str(b.get("service", "")))


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_iam_is_exactly_what_it_needs(function: str, modules: dict[str, Module], root: Module) -> None:
    given = grants(modules["functions"], modules["secrets"], root)
    assert function in EXPECTED_GRANTS, f"functions/{function} has no expected IAM in this test"
    assert given.get(function, set()) == EXPECTED_GRANTS[function]


def test_task_assignment_cannot_read_device_updates(modules: dict[str, Module], root: Module) -> None:
    given = grants(modules["functions"], modules["secrets"], root)["task_assignment"]
    assert not {g for g in given if g[0] == "bucket" and g[2] == "gradient" and g[1] in READ_ROLES}


def test_no_broad_roles_anywhere(root: Module, modules: dict[str, Module]) -> None:
    for module in [root, *modules.values()]:
        for (kind, name), body in module.resources.items():
            role = body.get("role")
            if role is None:
                continue
            assert role not in FORBIDDEN_ROLES, f"{kind}.{name} grants {role}"
            if kind in ("google_project_iam_member", "google_project_iam_binding", "google_project_iam_policy"):
                assert kind == "google_project_iam_member", f"{kind}.{name}: use additive members"
                assert role in PROJECT_ROLES_ALLOWED, f"{kind}.{name}: project-wide {role}"
                if role == "roles/pubsub.publisher":  # only the Cloud Storage service agent (Eventarc)
                    assert "gcs_agent" in body["member"], f"{kind}.{name}: publish on the topic, not the project"


def test_buckets_uniform_access_versioning_and_lifecycle(modules: dict[str, Module]) -> None:
    storage = modules["storage"]
    all_buckets = {**storage.of_type("google_storage_bucket"), **modules["functions"].of_type("google_storage_bucket")}
    assert {"model", "gradient", "aggregate"} <= set(all_buckets)
    for name, body in all_buckets.items():
        assert body["uniform_bucket_level_access"] is True, f"bucket {name}"
        assert body["public_access_prevention"] == "enforced", f"bucket {name}"
    buckets = storage.of_type("google_storage_bucket")
    assert block(buckets["model"], "versioning")["enabled"] is True
    for name, variable in (("gradient", "gradient_retention_days"), ("aggregate", "aggregate_retention_days")):
        rules = buckets[name]["lifecycle_rule"]
        deletes = [r for r in rules if block(r, "action")["type"] == "Delete"]
        assert [block(r, "condition")["age"] for r in deletes] == [f"${{var.{variable}}}"], name
    assert storage.variables["gradient_retention_days"]["default"] == 1


def test_every_subscription_dead_letters_after_five_attempts(modules: dict[str, Module], root: Module) -> None:
    pubsub = modules["pubsub"]
    subscriptions = pubsub.of_type("google_pubsub_subscription")
    assert {"push", "pull", "dead_letter_inspect"} <= set(subscriptions)
    for name, body in subscriptions.items():
        if name == "dead_letter_inspect":  # the dead-letter topics' own retaining subscriptions
            assert body["topic"] == "${google_pubsub_topic.dead_letter[each.value].id}"
            assert "dead_letter_policy" not in body
            continue
        policy = block(body, "dead_letter_policy")
        assert policy["dead_letter_topic"].startswith("${google_pubsub_topic.dead_letter[")
        assert pubsub.var_default(policy["max_delivery_attempts"]) == 5
        retry = block(body, "retry_policy")
        assert retry["minimum_backoff"] and retry["maximum_backoff"]
    assert pubsub.of_type("google_pubsub_topic")["dead_letter"]["name"] == "${each.value}-dead-letter"
    # Dead-lettering needs the Pub/Sub service agent on both ends.
    publisher = pubsub.of_type("google_pubsub_topic_iam_member")["dead_letter_publisher"]
    subscriber = pubsub.of_type("google_pubsub_subscription_iam_member")["dead_letter_subscriber"]
    assert publisher["role"] == "roles/pubsub.publisher" and subscriber["role"] == "roles/pubsub.subscriber"
    assert publisher["member"] == subscriber["member"] == "${local.pubsub_agent}"
    assert "gcp-sa-pubsub" in pubsub.locals["pubsub_agent"]
    # The code's topics (fedcompute.settings.Topics minus the local-only one) are all created.
    from fedcompute.settings import Topics

    expected = {t for t in Topics().all() if t != Topics().gcs_notifications}
    assert set(root.locals["topics"].values()) == expected


def test_firestore_native_and_scheduler_every_minute(modules: dict[str, Module], root: Module) -> None:
    database = modules["firestore"].of_type("google_firestore_database")["default"]
    assert database["type"] == "FIRESTORE_NATIVE" and database["name"] == "(default)"
    job = modules["scheduler"].of_type("google_cloud_scheduler_job")["tick"]
    assert modules["scheduler"].var_default(job["schedule"]) == root.variables["scheduler_cron"]["default"] == "* * * * *"
    assert block(job, "pubsub_target")["topic_name"] == "${var.topic_id}"
    assert root.modules["scheduler"]["topic_id"] == "${module.pubsub.topic_ids[local.topics.scheduler_tick]}"


def test_functions_get_the_environment_the_code_reads(modules: dict[str, Module]) -> None:
    fm = modules["functions"]
    env = fm.locals["common_env"]
    for name in ("FEDCOMPUTE_PROJECT", "FEDCOMPUTE_MODEL_BUCKET", "FEDCOMPUTE_GRADIENT_BUCKET",
                 "FEDCOMPUTE_AGGREGATE_BUCKET"):
        assert name in env
    assert env["FEDCOMPUTE_STORAGE_PUBLIC_URL"] == ""  # cloud: signed URLs
    builder_env = block(fm.of_type("google_cloudfunctions2_function")["task_builder"],
                        "service_config")["environment_variables"]
    assert "FEDCOMPUTE_TASK_MANAGEMENT_URL" in builder_env and "task_management.url" in builder_env


def test_terraform_fmt_is_clean() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.fail("terraform is not on PATH: install Terraform >= 1.5 (https://developer.hashicorp.com/terraform/"
                    "install) to check infra/ formatting")
    run = subprocess.run([terraform, "fmt", "-check", "-recursive", "-diff", str(INFRA)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, f"terraform fmt -check failed; run `terraform fmt -recursive infra`:\n{run.stdout}"


# ------------------------------------------------------------------ function packaging

from fedcompute.deploy import package  # noqa: E402  (pure: no TensorFlow, no cloud client)


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, str]]:
    """Each function's pins as `uv export` writes them from its own lock (offline, --frozen)."""
    return {name: package.parse_pins(package.export_requirements(spec, ROOT))
            for name, spec in package.FUNCTIONS.items()}


def test_parse_pins_reads_exported_lines_with_markers_and_comments() -> None:
    text = ("# header\nanyio==4.16.0\ncffi==2.1.1 ; platform_python_implementation != 'PyPy'\n"
            "Google_Auth==2.63.0\n    # via x\n\n")
    assert package.parse_pins(text) == {"anyio": "4.16.0", "cffi": "2.1.1", "google-auth": "2.63.0"}


def test_each_function_exports_from_its_own_lock_and_runtime() -> None:
    for name, spec in package.FUNCTIONS.items():
        arguments = package.export_arguments(spec, ROOT)
        if spec.heavy:
            assert (spec.runtime, arguments) == ("python311", ["--project", str(ROOT), "--only-group",
                                                               package.HEAVY_GROUP]), name
        else:
            assert (spec.runtime, arguments) == ("python312", ["--project", str(ROOT / package.LIGHT_PROJECT)]), name


def test_light_lock_is_current_python_protobuf_5_and_grpcio_1_83_without_tensorflow(
        exported: dict[str, dict[str, str]]) -> None:
    def version(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(".")[:2])

    for name, spec in package.FUNCTIONS.items():
        pins = exported[name]
        family = {"tensorflow", "tensorflow-privacy", "tensorflow-federated", "jax", "jaxlib", "keras"} & set(pins)
        if spec.heavy:
            assert {"tensorflow", "tensorflow-privacy", "dp-accounting"} <= set(pins)
            assert "tensorflow-federated" not in pins and version(pins["protobuf"]) < (5, 0)
        else:
            assert not family, f"{name} would install {family}"
            assert version(pins["protobuf"]) >= (5, 0) and version(pins["grpcio"]) >= (1, 83), name
    light = ROOT / package.LIGHT_PROJECT / "pyproject.toml"
    assert 'requires-python = ">=3.12' in light.read_text()


def _third_party_imports(function: str) -> set[str]:
    """Top-level third-party modules `functions/<f>/main.py` imports at module level (following
    fedcompute modules), plus the lazy imports inside those modules' functions (one level)."""
    import ast
    import sys as _sys

    shared = ROOT / "shared"

    def source_of(module: str) -> Path | None:
        for candidate in (shared / (module.replace(".", "/") + ".py"), shared / module.replace(".", "/") / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    found: set[str] = set()
    seen: set[str] = set()
    todo = [(ROOT / "functions" / function / "main.py", "main")]
    while todo:
        path, name = todo.pop()
        package_name = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, lazy: bool) -> None:
            for child in ast.iter_child_nodes(node):
                child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package_name.split(".")[: len(package_name.split(".")) - child.level + 1]  # noqa: B023 (visit runs inside this iteration)
                        base = ".".join(parts + ([child.module] if child.module else []))
                    names = [base] + [f"{base}.{a.name}" for a in child.names]
                elif isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                    continue
                else:
                    visit(child, child_lazy)
                for module in names:
                    top = module.split(".")[0]
                    if top == "fedcompute":
                        if child_lazy:
                            continue
                        parts = module.split(".")
                        for i in range(1, len(parts) + 1):
                            sub = ".".join(parts[:i])
                            src = source_of(sub)
                            if src and sub not in seen:
                                seen.add(sub)
                                todo.append((src, sub))
                    elif top not in _sys.stdlib_module_names and top != "__future__":
                        found.add(".".join(module.split(".")[:3]) if top == "google" else top)

        visit(ast.parse(path.read_text()), False)
    return found


IMPORT_TO_DISTRIBUTION = {
    "flask": "flask", "functions_framework": "functions-framework", "numpy": "numpy", "requests": "requests",
    "scipy": "scipy", "tensorflow": "tensorflow", "tensorflow_privacy": "tensorflow-privacy",
    "dp_accounting": "dp-accounting", "flatbuffers": "flatbuffers", "google.protobuf": "protobuf",
    "google.api_core": "google-api-core", "google.auth": "google-auth", "google.oauth2": "google-auth",
    "google.cloud.storage": "google-cloud-storage",
    "google.cloud.pubsub_v1": "google-cloud-pubsub", "google.cloud.firestore": "google-cloud-firestore",
    "google.cloud.firestore_v1": "google-cloud-firestore", "cryptography": "cryptography", "pybase64": "pybase64",
    "google_crc32c": "google-crc32c", "urllib3": "urllib3",
}


@pytest.mark.parametrize("function", FUNCTIONS)
def test_packaged_requirements_cover_what_the_function_imports(function: str,
                                                                exported: dict[str, dict[str, str]]) -> None:
    assert function in package.FUNCTIONS, f"functions/{function} is not in fedcompute.catalogue.FUNCTIONS"
    pins = exported[function]
    for module in sorted(_third_party_imports(function)):
        key = next((k for k in IMPORT_TO_DISTRIBUTION if module == k or module.startswith(k + ".")), None)
        if key is None and module.startswith("google.") and module.count(".") == 1:
            key = {"google.auth": "google.auth", "google.protobuf": "google.protobuf"}.get(module)
        if module in ("google.cloud",):  # namespace package
            continue
        assert key is not None, f"{function} imports {module}: map it to its distribution in this test"
        assert IMPORT_TO_DISTRIBUTION[key] in pins, f"{function} imports {module} but does not pin " \
                                                     f"{IMPORT_TO_DISTRIBUTION[key]}"


def test_package_is_reproducible(tmp_path: Path) -> None:
    first = package.package_function("scheduler", tmp_path / "a")
    second = package.package_function("scheduler", tmp_path / "b")
    assert first.zip_path.read_bytes() == second.zip_path.read_bytes()
    import zipfile

    with zipfile.ZipFile(first.zip_path) as archive:
        names = archive.namelist()
        assert names == sorted(names)
        assert {"main.py", "requirements.txt", "fedcompute/__init__.py"} <= set(names)
        assert all(i.date_time == package.ZIP_TIMESTAMP for i in archive.infolist())
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # A changed source changes the zip (so Terraform re-deploys it).
    (first.folder / "main.py").write_text("# changed\n")
    package.deterministic_zip(first.folder, tmp_path / "changed.zip")
    assert (tmp_path / "changed.zip").read_bytes() != second.zip_path.read_bytes()


def test_package_cli_rejects_unknown_function(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        package.main(["--out", str(tmp_path), "--function", "nope"])
    assert exit_info.value.code == 2
    assert package.main(["--out", str(tmp_path), "--function", "task_management"]) == 0
    assert (tmp_path / "task_management.zip").is_file()
    assert "task_management:" in capsys.readouterr().out


def test_light_functions_serve_concurrent_requests_and_heavy_ones_one(modules: dict[str, Module]) -> None:
    fm = modules["functions"]
    concurrency = {name: values["concurrency"] for name, values in catalogue_json().items()}
    for function, body in fm.of_type("google_cloudfunctions2_function").items():
        assert block(body, "service_config")["max_instance_request_concurrency"] == f"${{local.concurrency.{function}}}"
    assert concurrency["task_assignment"] >= 32 and concurrency["result_ingestion"] > 1
    assert concurrency["aggregator"] == concurrency["task_builder"] == 1


def test_monotonic_timestamps_are_not_indexed(modules: dict[str, Module]) -> None:
    firestore = modules["firestore"]
    fields = firestore.locals["unindexed_fields"]
    assert {(f["collection"], f["field"]) for f in fields.values()} >= {
        ("assignments", "created_time"), ("assignments", "updated_time"), ("accepted", "time")}
    resource = firestore.of_type("google_firestore_field")["unindexed"]
    assert block(resource, "index_config") == {}


# ------------------------------------------------------------------ function catalogue

def test_committed_catalogue_json_matches_the_catalogue() -> None:
    from fedcompute.deploy import catalogue

    committed = (ROOT / catalogue.CATALOGUE_JSON).read_text()
    assert committed == catalogue.render(), ("infra's catalogue.json is stale: run "
                                             "`python -m fedcompute.deploy.catalogue --write` and commit it")
    assert catalogue.main(["--check"]) == 0


def test_catalogue_check_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedcompute.deploy import catalogue

    target = tmp_path / catalogue.CATALOGUE_JSON
    target.parent.mkdir(parents=True)
    target.write_text('{"task_builder": {}}\n')
    assert catalogue.main(["--check", "--root", str(tmp_path)]) == 1
    assert "--write" in capsys.readouterr().err
    assert catalogue.main(["--write", "--root", str(tmp_path)]) == 0
    assert catalogue.main(["--check", "--root", str(tmp_path)]) == 0


def test_every_function_folder_is_in_the_catalogue_once() -> None:
    from fedcompute.catalogue import ALL_FUNCTIONS

    assert sorted(ALL_FUNCTIONS) == FUNCTIONS, "add the function to fedcompute.catalogue.FUNCTIONS"
    assert sorted(catalogue_json()) == FUNCTIONS


def test_terraform_takes_per_function_values_from_the_catalogue(modules: dict[str, Module]) -> None:
    fm = modules["functions"]
    assert fm.locals["catalogue"] == '${jsondecode(file("${path.module}/catalogue.json"))}'
    assert fm.locals["functions"] == "${keys(local.catalogue)}"
    for local_name, field in (("runtimes", "runtime"), ("default_max_instances", "max_instances"),
                              ("concurrency", "concurrency")):
        assert fm.locals[local_name] == f"${{{{for f, spec in local.catalogue : f => spec.{field}}}}}", local_name


def test_terraform_sizing_and_push_deadlines_agree_with_the_catalogue(modules: dict[str, Module],
                                                                     root: Module) -> None:
    from fedcompute.catalogue import FUNCTIONS as CATALOGUE
    from fedcompute.catalogue import Trigger

    fm = modules["functions"]
    for name, spec in CATALOGUE.items():
        # Memory and timeout stay operator knobs (root variables); their defaults are the catalogue's.
        assert fm.var_default(fm.locals["memory"][name]) == spec.memory, name
        service = block(fm.of_type("google_cloudfunctions2_function")[name], "service_config")
        assert fm.var_default(service["timeout_seconds"]) == spec.timeout_s, name
        memory_variable = {"task_builder": "task_builder_memory", "aggregator": "aggregator_memory"}.get(
            name, "light_memory")
        assert root.variables[memory_variable]["default"] == spec.memory, name
    subscriptions = root.modules["pubsub"]["push_subscriptions"].values()
    topics = root.locals["topics"]
    for name, spec in CATALOGUE.items():
        mine = [s for s in subscriptions if s["push_endpoint"] == f"${{module.functions.urls.{name}}}"]
        if spec.trigger is not Trigger.TOPIC:
            assert not mine, f"{name} is not pushed by a topic"
            continue
        assert {s["ack_deadline_seconds"] for s in mine} == {spec.ack_deadline_s}, name
        pushed = {re.fullmatch(r"\$\{local\.topics\.(\w+)\}", s["topic"]).group(1) for s in mine}
        # Its topic, plus extra topics the catalogue lists (the aggregator's aggregation-shard;
        # the scheduler's round-completed is pushed locally only).
        assert spec.topic_field in pushed and pushed - {spec.topic_field} <= set(spec.extra_topic_fields), name
        assert spec.topic_field in topics


def test_instance_variable_validations_name_the_catalogue_functions(root: Module) -> None:
    # Terraform >= 1.5 validations may only read their own variable, so the names are spelled
    # out there: they must be the catalogue's.
    from fedcompute.catalogue import ALL_FUNCTIONS

    for variable in ("min_instances", "max_instances"):
        condition = root.variables[variable]["validation"][0]["condition"]
        listed = re.search(r"contains\(\[([^\]]*)\]", condition)
        assert listed, variable
        assert sorted(n.strip().strip('"') for n in listed.group(1).split(",")) == sorted(ALL_FUNCTIONS), variable
