"""The deployment artefacts, checked offline by the real tools (specification §3.1, §7, §11).

No AWS here, so: hadolint, cfn-lint, checkov and actionlint (from requirements-tools.lock, in
.venv-tools) lint what they know, and the task definition is validated against the ECS
RegisterTaskDefinition input model shipped in botocore. The image itself is built from the
Dockerfile and started in tests/test_image.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from listeners import config

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".venv-tools" / "bin"
TEMPLATES = sorted((ROOT / "deploy" / "cloudformation").glob("*.yaml"))
SPEC_START = ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8080"]  # noqa: S104 (§3.1)
# §3.1: the runtime parameters of the task definition (the password through "secrets").
SPEC_RUNTIME = {
    "AWS_REGION_NAME",
    "GOOGLE_PROJECT_ID",
    "GOOGLE_SERVICE_ACCOUNT_SECRET",
    "AWS_SECRET_NAME",
    "LISTENERS_REDIS_HOST",
    "LISTENERS_REDIS_PORT",
    "LISTENERS_REDIS_PASSWORD",
    "LISTENERS_REDIS_TLS",
    "LISTENERS_REDIS_DB",
    "LISTENERS_CHANNEL_PREFIX",
}
SECRET_VALUED = re.compile(r"PASSWORD|TOKEN|PRIVATE|CREDENTIALS|ADMIN_JSON")


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} is missing: `bash scripts/bootstrap` installs requirements-tools.lock"
    return str(path)


def run(*command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{TOOLS}{os.pathsep}{os.environ['PATH']}"}  # actionlint finds shellcheck
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def tools_python(code: str, *args: str) -> Any:
    """Runs `code` in the tools venv (PyYAML, cfn-lint, botocore) and returns its JSON output."""
    result = run(tool("python"), "-c", code, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@functools.cache
def cfn(path: Path) -> dict[str, Any]:
    code = (
        "import json, sys\nfrom cfnlint.decode import decode\n"
        "template, errors = decode(sys.argv[1])\nassert not errors, errors\n"
        "print(json.dumps(template, default=str))"
    )
    data: dict[str, Any] = tools_python(code, str(path))
    return data


@functools.cache
def yaml_file(path: Path) -> dict[str, Any]:
    code = "import json, sys, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
    data: dict[str, Any] = tools_python(code, str(path))
    return data


# ------------------------------------------------------------------ Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages() -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    logical = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        logical += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, args = logical.strip().partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def only(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in stage if i.keyword == keyword]


def test_hadolint_passes() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_follows_the_specification() -> None:
    build, final = dockerfile_stages()
    assert only(build, "FROM") == ["python:3.11-slim AS build"]
    assert only(final, "FROM") == ["python:3.11-slim"]
    assert json.loads(only(final, "CMD")[0]) == SPEC_START  # exec form: uvicorn is PID 1
    assert only(final, "EXPOSE") == ["8080"]
    assert only(final, "STOPSIGNAL") == ["SIGTERM"]
    assert only(final, "USER") and only(final, "USER")[0].split(":")[0] not in ("root", "0")
    healthcheck = only(final, "HEALTHCHECK")[0]
    assert "/healthz" in healthcheck and " CMD [" in healthcheck
    installs = " ".join(only(build, "RUN"))
    assert "--require-hashes -r requirements.lock" in installs
    assert installs.count("--only-binary=:all:") == 2  # wheels only: nothing is compiled
    # The final stage installs nothing: it takes the venv built above and the app/ package.
    assert only(final, "COPY") == ["--from=build /opt/venv /opt/venv", "app ./app"]
    assert not any("install" in r.replace("uninstall", "") for r in only(final, "RUN"))


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((negate, re.compile(regex + "$")))
    return patterns


def in_build_context(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, pattern in dockerignore_patterns():
        if any(pattern.match(p) for p in prefixes):
            excluded = not negate
    return not excluded


def test_dockerignore_keeps_tests_benchmarks_and_local_files_out() -> None:
    kept = ["requirements.lock", "deploy/build-requirements.lock", "pyproject.toml", "app/main.py"]
    kept += [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")]
    for path in kept:
        assert in_build_context(path), path
    out = [
        "tests/test_deploy.py",
        "bench/latency.py",
        "docs/benchmarks.md",
        ".venv/bin/python",
        ".venv-tools/bin/checkov",
        "node_modules/yargs/index.js",
        ".git/HEAD",
        ".env",
        "key.pem",
        "requirements-dev.lock",
        "src/listeners/__pycache__/cli.cpython-311.pyc",
        "src/listeners.egg-info/PKG-INFO",
        "deploy/task-definition.jsonc",
    ]
    for path in out:
        assert not in_build_context(path), path


# ------------------------------------------------------------------ task definition

OUTPUTS = {
    "Region": "us-east-1",
    "TaskExecutionRoleArn": "arn:aws:iam::123456789012:role/listeners-infra-TaskExecutionRole-AAAA",
    "TaskRoleArn": "arn:aws:iam::123456789012:role/listeners-infra-TaskRole-BBBB",
    "LogGroupName": "/ecs/listeners-service",
    "RedisHost": "master.listeners.abcdef.use1.cache.amazonaws.com",
    "RedisPort": "6379",
    "RedisServiceUserSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:RedisUser-x1Y2z3",
    "GoogleCredentialsSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:google-AbCdEf",
    "GoogleProjectId": "pinnokio-prod",
    "WebSocketUrl": "wss://listeners.example.com/ws",
    "AlbDnsName": "listeners-123.us-east-1.elb.amazonaws.com",
    "TrustedProxyCidrs": "10.0.0.0/16",
}


def render(outputs: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """deploy/render.py as the workflow runs it, on describe-stacks' output format."""
    return subprocess.run(
        [sys.executable, "deploy/render.py", "--outputs", "/dev/stdin"],
        input=json.dumps([{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()]),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def task_definition(outputs: dict[str, str] = OUTPUTS) -> dict[str, Any]:
    result = render(outputs)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def service_container(td: dict[str, Any]) -> dict[str, Any]:
    """The service's container; the other is the metrics sidecar (test_metrics_sidecar)."""
    containers: dict[str, dict[str, Any]] = {c["name"]: c for c in td["containerDefinitions"]}
    assert set(containers) == {"listeners", "metrics-sidecar"}
    return containers["listeners"]


_VALIDATE = """
import json, sys
import botocore.session
from botocore.validate import ParamValidator

model = botocore.session.get_session().get_service_model("ecs")
shape = model.operation_model("RegisterTaskDefinition").input_shape
params = json.load(sys.stdin)
report = ParamValidator().validate(params, shape)
problems = [report.generate_report()] if report.has_errors() else []

def enums(value, shape, path):  # ParamValidator leaves enums to the service: check them here
    if shape.type_name == "structure":
        for name, member in shape.members.items():
            if name in value:
                enums(value[name], member, f"{path}.{name}")
    elif shape.type_name == "list":
        for i, item in enumerate(value):
            enums(item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "map":
        for key, item in value.items():
            enums(item, shape.value, f"{path}.{key}")
    elif getattr(shape, "enum", None) and value not in shape.enum:
        problems.append(f"{path}: {value!r} not one of {shape.enum}")

enums(params, shape, "taskDefinition")
print(json.dumps(problems))
"""


def test_task_definition_is_a_valid_register_task_definition_input() -> None:
    rendered = json.dumps(task_definition())
    result = run(tool("python"), "-c", _VALIDATE, input=rendered)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_task_definition_is_fargate_sized_and_wired() -> None:
    td = task_definition()
    container = service_container(td)
    assert td["requiresCompatibilities"] == ["FARGATE"] and td["networkMode"] == "awsvpc"
    assert (td["cpu"], td["memory"]) == ("2048", "4096")  # 2 vCPU pair with 4-16 GB on Fargate
    assert td["executionRoleArn"] == OUTPUTS["TaskExecutionRoleArn"]
    assert td["taskRoleArn"] == OUTPUTS["TaskRoleArn"] != td["executionRoleArn"]
    assert container["portMappings"][0]["containerPort"] == 8080
    logs = container["logConfiguration"]
    assert logs["logDriver"] == "awslogs"
    assert logs["options"]["awslogs-group"] == OUTPUTS["LogGroupName"]
    assert logs["options"]["awslogs-region"] == OUTPUTS["Region"]
    _, final = dockerfile_stages()
    healthcheck = json.loads(only(final, "HEALTHCHECK")[0].split(" CMD ", 1)[1])
    assert container["healthCheck"]["command"] == ["CMD", *healthcheck]  # the image's own check
    # The stop fits: the whole of it (uvicorn's drain inside) is bounded from SIGTERM by the
    # service's budget (its watchdog), well before SIGKILL.
    env = {e["name"]: e["value"] for e in container["environment"]}
    dockerfile_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(only(final, "ENV"))))
    budget = int(env["LISTENERS_SHUTDOWN_TIMEOUT_SECONDS"])
    assert int(dockerfile_env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"]) <= budget / 2
    assert budget + 5 <= container["stopTimeout"] <= 120
    assert container["readonlyRootFilesystem"] is True
    # One uvicorn worker per vCPU (the GIL), with the WebSocket protocol made for them.
    assert int(env["WEB_CONCURRENCY"]) == int(td["cpu"]) // 1024
    assert (
        env["UVICORN_WS"]
        == dockerfile_env["UVICORN_WS"]
        == "listeners.deliver.wsprotocol:DirectWebSocketProtocol"
    )
    # and the HTTP protocol that refuses upgrades before any of it (issue 28)
    assert (
        env["UVICORN_HTTP"]
        == dockerfile_env["UVICORN_HTTP"]
        == "listeners.deliver.httpprotocol:GuardedHttpProtocol"
    )


def test_task_definition_environment_has_no_secret() -> None:
    container = service_container(task_definition())
    env = {e["name"]: e["value"] for e in container["environment"]}
    secrets = {s["name"]: s["valueFrom"] for s in container["secrets"]}
    assert SPEC_RUNTIME - {"GOOGLE_SERVICE_ACCOUNT_SECRET", "AWS_SECRET_NAME"} <= set(env) | set(secrets)
    assert not [name for name in env if SECRET_VALUED.search(name)]
    assert secrets == {  # the service's own Redis user: name and password from one secret
        "LISTENERS_REDIS_USERNAME": OUTPUTS["RedisServiceUserSecretArn"] + ":username::",
        "LISTENERS_REDIS_PASSWORD": OUTPUTS["RedisServiceUserSecretArn"] + ":password::",
        "GOOGLE_APPLICATION_CREDENTIALS_JSON": OUTPUTS["GoogleCredentialsSecretArn"],
    }
    # Every key of the settings table, the WebSocket protocol's own and the Redis keys included.
    keys = {k.env for k in config.table()}
    uvicorn = ("WEB_CONCURRENCY",)  # uvicorn's worker count, besides its UVICORN_ options
    for name in [*env, *secrets]:  # every variable is one the service (or uvicorn) reads: no typo
        assert name.startswith("UVICORN_") or name in uvicorn or name in keys, name


def test_optional_outputs_are_left_out_and_missing_ones_named() -> None:
    with_optional = {**OUTPUTS, "GoogleServiceAccountSecret": "pinnokio/sa", "AwsSecretName": "pinnokio/aws"}
    container = service_container(task_definition(with_optional))
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert env["GOOGLE_SERVICE_ACCOUNT_SECRET"] == "pinnokio/sa" and env["AWS_SECRET_NAME"] == "pinnokio/aws"
    container = service_container(task_definition())
    assert not {"GOOGLE_SERVICE_ACCOUNT_SECRET", "AWS_SECRET_NAME"} & {
        e["name"] for e in container["environment"]
    }
    result = render({k: v for k, v in OUTPUTS.items() if k not in ("RedisHost", "TaskRoleArn")})
    assert result.returncode == 2
    assert "missing: RedisHost, TaskRoleArn" in result.stderr


def test_uvicorn_settings_are_real_options_and_fit_the_alb() -> None:
    import uvicorn

    # uvicorn's command line is a click command whose options also read UVICORN_<NAME>.
    options = {f"UVICORN_{p.name.upper()}" for p in uvicorn.main.params if p.name}
    container = service_container(task_definition())
    env = {e["name"]: e["value"] for e in container["environment"]}
    _, final = dockerfile_stages()
    dockerfile_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(only(final, "ENV"))))
    for name in [*env, *dockerfile_env]:
        assert not name.startswith("UVICORN_") or name in options, name
    infra = cfn(ROOT / "deploy" / "cloudformation" / "infra.yaml")["Resources"]
    attributes = {a["Key"]: a["Value"] for a in infra["LoadBalancer"]["Properties"]["LoadBalancerAttributes"]}
    assert int(env["UVICORN_TIMEOUT_KEEP_ALIVE"]) > int(attributes["idle_timeout.timeout_seconds"]) >= 60


def test_every_placeholder_is_an_infra_output() -> None:
    lines = (ROOT / "deploy" / "task-definition.jsonc").read_text().splitlines()
    template = "\n".join(line for line in lines if not line.lstrip().startswith("//"))
    placeholders = dict(re.findall(r"\$\{(\w+)(\??)\}", template))
    outputs = cfn(ROOT / "deploy" / "cloudformation" / "infra.yaml")["Outputs"]
    for name, optional in placeholders.items():
        assert name in outputs, name
        assert ("Condition" in outputs[name]) == bool(optional), (
            f"{name}: conditional output iff ${{{name}?}}"
        )
    assert set(OUTPUTS) <= set(outputs)


# ------------------------------------------------------------------ CloudFormation


def test_cfn_lint_passes() -> None:
    result = run(tool("cfn-lint"), *map(str, TEMPLATES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_infrastructure_matches_section_7() -> None:
    infra = cfn(ROOT / "deploy" / "cloudformation" / "infra.yaml")["Resources"]
    redis = infra["Redis"]["Properties"]
    assert redis["TransitEncryptionEnabled"] is True and redis["AtRestEncryptionEnabled"] is True
    assert redis["TransitEncryptionMode"] == "required"
    assert redis["UserGroupIds"] == [{"Ref": "RedisUserGroup"}] and "AuthToken" not in redis
    ingress = [r["Properties"] for r in infra.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"]
    to_redis = [i for i in ingress if i["GroupId"] == {"Ref": "RedisSecurityGroup"}]
    assert {json.dumps(i["SourceSecurityGroupId"]) for i in to_redis} == {
        json.dumps({"Ref": "TaskSecurityGroup"}),
        json.dumps({"Ref": "ReflexBackendSecurityGroupId"}),
    }
    assert not any("CidrIp" in i for i in to_redis)
    to_tasks = [i for i in ingress if i["GroupId"] == {"Ref": "TaskSecurityGroup"}]
    assert [(i["SourceSecurityGroupId"], i["FromPort"]) for i in to_tasks] == [
        ({"Ref": "AlbSecurityGroup"}, 8080),
        ({"Ref": "MetricsScraperSecurityGroupId"}, 8080),  # only when given (condition)
    ]
    assert infra["TasksFromScraperIngress"]["Condition"] == "HasMetricsScraper"
    hidden = infra["HideMetrics"]["Properties"]  # /metrics is not served to the internet
    assert hidden["Conditions"][0]["PathPatternConfig"]["Values"] == ["/metrics", "/metrics/*"]
    assert hidden["Actions"][0]["FixedResponseConfig"]["StatusCode"] == "404"
    https = infra["HttpsListener"]["Properties"]
    assert https["Protocol"] == "HTTPS" and https["Certificates"] == [
        {"CertificateArn": {"Ref": "CertificateArn"}}
    ]
    redirect = infra["HttpRedirectListener"]["Properties"]["DefaultActions"][0]
    assert redirect["Type"] == "redirect" and redirect["RedirectConfig"]["Protocol"] == "HTTPS"
    target = infra["TargetGroup"]["Properties"]
    assert (target["HealthCheckPath"], target["Port"], target["TargetType"]) == ("/healthz", 8080, "ip")
    assert infra["LogGroup"]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert "Policies" not in infra["TaskRole"]["Properties"]  # the task itself needs no AWS API


def test_waf_rate_limits_websocket_upgrades_and_requests_at_the_alb() -> None:
    infra = cfn(ROOT / "deploy" / "cloudformation" / "infra.yaml")["Resources"]
    acl = infra["WebAcl"]["Properties"]
    assert acl["Scope"] == "REGIONAL" and acl["DefaultAction"] == {"Allow": {}}
    rules = {r["Name"]: r for r in acl["Rules"]}
    upgrades = rules["websocket-upgrades-per-ip"]["Statement"]["RateBasedStatement"]
    assert upgrades["AggregateKeyType"] == "IP" and upgrades["Limit"] == {"Ref": "WafWebSocketLimit"}
    match = upgrades["ScopeDownStatement"]["ByteMatchStatement"]
    assert (match["SearchString"], match["PositionalConstraint"]) == ("/ws", "STARTS_WITH")
    every = rules["requests-per-ip"]["Statement"]["RateBasedStatement"]
    assert every["Limit"] == {"Ref": "WafHttpLimit"} and "ScopeDownStatement" not in every
    for name in ("websocket-upgrades-per-ip", "requests-per-ip"):
        assert rules[name]["Action"]["Block"]["CustomResponse"]["ResponseCode"] == 429
    association = infra["WebAclAssociation"]["Properties"]
    assert association == {
        "ResourceArn": {"Ref": "LoadBalancer"},
        "WebACLArn": {"Fn::GetAtt": ["WebAcl", "Arn"]},
    }
    # the tasks count callers behind the ALB by X-Forwarded-For, trusting the VPC's hops
    env = {e["name"]: e["value"] for e in task_definition()["containerDefinitions"][0]["environment"]}
    assert env["LISTENERS_TRUSTED_PROXY_CIDRS"] == OUTPUTS["TrustedProxyCidrs"]


def test_redis_users_log_in_with_their_own_generated_passwords() -> None:
    """ElastiCache RBAC (docs/security.md): the service, the Reflex backend and a
    switched-off `default`, each with a password generated in Secrets Manager whose `username`
    is the user's name; only the service's secret reaches the task. The access strings
    themselves are checked, and exercised on a real redis-server, in tests/test_redis_acl.py."""
    infra = cfn(ROOT / "deploy" / "cloudformation" / "infra.yaml")["Resources"]
    users = {name: r["Properties"] for name, r in infra.items() if r["Type"] == "AWS::ElastiCache::User"}
    secret_of = {
        "RedisServiceUser": "RedisServiceUserSecret",
        "RedisBackendUser": "RedisBackendUserSecret",
        "RedisDefaultUser": "RedisDefaultUserSecret",
    }
    assert set(users) == set(secret_of)
    for name, props in users.items():
        secret = infra[secret_of[name]]["Properties"]["GenerateSecretString"]
        assert json.loads(secret["SecretStringTemplate"]) == {"username": props["UserName"]}, name
        assert secret["GenerateStringKey"] == "password" and secret["PasswordLength"] >= 32
        assert props["AuthenticationMode"]["Type"] == "password" and "NoPasswordRequired" not in props
        (password,) = props["AuthenticationMode"]["Passwords"]
        assert json.dumps(password) == json.dumps(
            {"Fn::Sub": f"{{{{resolve:secretsmanager:${{{secret_of[name]}}}:SecretString:password}}}}"}
        ), name
        assert props["Engine"] == {"Ref": "RedisEngine"}
    assert users["RedisDefaultUser"]["UserName"] == "default"
    assert users["RedisDefaultUser"]["AccessString"].split()[0] == "off"
    assert len({json.dumps(p["UserId"]) for p in users.values()}) == 3
    group = infra["RedisUserGroup"]["Properties"]
    assert sorted(u["Ref"] for u in group["UserIds"]) == sorted(secret_of)
    assert group["Engine"] == {"Ref": "RedisEngine"}
    statements = infra["TaskExecutionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    (task_secrets,) = [s for s in statements if s["Sid"] == "TaskSecrets"]
    assert {"Ref": "RedisServiceUserSecret"} in task_secrets["Resource"]
    assert not {json.dumps({"Ref": s}) for s in ("RedisBackendUserSecret", "RedisDefaultUserSecret")} & {
        json.dumps(r) for r in task_secrets["Resource"]
    }


def test_service_autoscales_on_cpu_from_one_task() -> None:
    service = cfn(ROOT / "deploy" / "cloudformation" / "service.yaml")
    resources, parameters = service["Resources"], service["Parameters"]
    props = resources["Service"]["Properties"]
    assert props["LaunchType"] == "FARGATE" and parameters["ClusterName"]["Default"] == "pinnokio_cluster"
    assert props["LoadBalancers"][0]["ContainerName"] == task_definition()["containerDefinitions"][0]["name"]
    assert props["LoadBalancers"][0]["ContainerPort"] == 8080
    assert props["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"
    assert "DesiredCount" not in props  # owned by autoscaling
    assert parameters["MinCapacity"]["Default"] == 1
    policy = resources["CpuScaling"]["Properties"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    metric = policy["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]
    assert metric["PredefinedMetricType"] == "ECSServiceAverageCPUUtilization"


def test_github_role_trusts_one_branch_of_one_repository() -> None:
    role = cfn(ROOT / "deploy" / "cloudformation" / "github-oidc.yaml")["Resources"]["DeployRole"][
        "Properties"
    ]
    (statement,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    conditions = statement["Condition"]["StringEquals"]
    assert conditions["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
    assert "ref:refs/heads/${Branch}" in json.dumps(conditions["token.actions.githubusercontent.com:sub"])


# ------------------------------------------------------------------ checkov


@pytest.fixture(scope="session")
def checkov() -> list[dict[str, Any]]:
    """One checkov run per target (its JSON mixes up several targets in one run)."""
    reports: list[dict[str, Any]] = []
    for target in (["-d", "deploy"], ["-d", ".github"], ["-f", "Dockerfile"]):
        result = run(
            tool("checkov"),
            *target,
            "--framework",
            "cloudformation",
            "github_actions",
            "dockerfile",
            "secrets",
            "--skip-download",  # offline: no Prisma Cloud guidelines
            "--output",
            "json",
        )
        assert result.returncode in (0, 1), result.stderr
        data = json.loads(result.stdout)
        reports += data if isinstance(data, list) else [data]
    return reports


def test_checkov_finds_nothing(checkov: list[dict[str, Any]]) -> None:
    assert {r["check_type"] for r in checkov} >= {"cloudformation", "github_actions", "dockerfile"}
    for report in checkov:
        assert report["summary"]["parsing_errors"] == 0, report["check_type"]
        assert report["summary"]["passed"] > 0, report["check_type"]
        failed = [(c["check_id"], c["file_path"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert failed == [], report["check_type"]


def test_every_suppressed_check_has_a_reason_and_is_needed(checkov: list[dict[str, Any]]) -> None:
    skipped = [c for r in checkov for c in r["results"]["skipped_checks"]]
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason.split()) >= 8, f"{check['check_id']} on {check['resource']}: reason too short"
    declared = []
    for path in TEMPLATES:
        for name, resource in cfn(path)["Resources"].items():
            for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
                declared.append((skip["id"], name))
    for path in (ROOT / ".github" / "workflows").glob("*.yml"):
        declared += [(c, path.name) for c in re.findall(r"checkov:skip=(\w+)", path.read_text())]
    used = {(c["check_id"], c["resource"].split(".")[-1]) for c in skipped}
    used |= {(c["check_id"], Path(c["file_path"]).name) for c in skipped}
    stale = [d for d in declared if d not in used]
    assert stale == [], "suppressions that no longer suppress anything"


# ------------------------------------------------------------------ GitHub Actions


def test_actionlint_passes() -> None:
    assert (TOOLS / "shellcheck").exists()  # actionlint also checks every run: script with it
    result = run(tool("actionlint"), *sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def steps_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if s.get("uses", "").startswith(action + "@")]


def test_deploy_workflow_follows_section_3_1() -> None:
    workflow = yaml_file(ROOT / ".github" / "workflows" / "deploy.yml")
    triggers = workflow.get("on") or workflow["true"]  # YAML 1.1 reads a bare `on` as true
    assert triggers["push"]["branches"] == ["main"]
    assert workflow["env"]["ECR_REPOSITORY"] == "listeners-service"
    assert workflow["env"]["ECS_CLUSTER"] == "pinnokio_cluster"
    assert workflow["jobs"]["test"]["uses"] == "./.github/workflows/ci.yml"
    job = workflow["jobs"]["deploy"]
    assert job["needs"] == "test"
    assert job["permissions"]["id-token"] == "write" and "id-token" not in workflow["permissions"]
    assert job["concurrency"]["cancel-in-progress"] is False and job["concurrency"]["group"]
    (credentials,) = steps_using(job, "aws-actions/configure-aws-credentials")
    assert credentials["with"]["role-to-assume"] == "${{ secrets.AWS_ROLE_TO_ASSUME }}"
    assert credentials["with"]["aws-region"] == "${{ secrets.AWS_REGION }}"
    script = "\n".join(s.get("run", "") for s in job["steps"])
    assert "aws ecr create-repository" in script and "RepositoryNotFoundException" in script
    assert (
        "--image-tag-mutability IMMUTABLE" in script and "file://deploy/ecr-lifecycle-policy.json" in script
    )
    (rule,) = json.loads((ROOT / "deploy" / "ecr-lifecycle-policy.json").read_text())["rules"]
    assert rule["selection"]["countType"] == "imageCountMoreThan" and rule["action"] == {"type": "expire"}
    assert "TAG: ${{ github.sha }}" in (ROOT / ".github" / "workflows" / "deploy.yml").read_text()
    assert "python3 deploy/render.py" in script
    (rendered,) = steps_using(job, "aws-actions/amazon-ecs-render-task-definition")
    container = task_definition()["containerDefinitions"][0]["name"]
    assert rendered["with"]["container-name"] == "${{ env.CONTAINER_NAME }}"
    assert workflow["env"]["CONTAINER_NAME"] == container
    (deployed,) = steps_using(job, "aws-actions/amazon-ecs-deploy-task-definition")
    assert deployed["with"]["cluster"] == "${{ env.ECS_CLUSTER }}"
    assert "secrets.ECS_SERVICE_NAME" in deployed["with"]["service"]
    assert deployed["with"]["wait-for-service-stability"] is True
    infra_stack = cfn(ROOT / "deploy" / "cloudformation" / "github-oidc.yaml")["Parameters"]["InfraStackName"]
    assert workflow["env"]["INFRA_STACK"] == infra_stack["Default"]


def test_ci_workflow_runs_the_readme_test_command_on_pull_requests() -> None:
    workflow = yaml_file(ROOT / ".github" / "workflows" / "ci.yml")
    triggers = workflow.get("on") or workflow["true"]
    assert "pull_request" in triggers and "workflow_call" in triggers
    assert "bash scripts/test" in (ROOT / "README.md").read_text()
    (job,) = workflow["jobs"].values()
    assert [s["run"] for s in job["steps"] if s.get("run", "").startswith("bash ")] == ["bash scripts/test"]
    (python,) = steps_using(job, "actions/setup-python")
    assert python["with"]["python-version"] == "3.11"


# ------------------------------------------------------------------ metrics (issue 25)


def test_metrics_sidecar_scrapes_the_task_into_what_the_alarms_read(tmp_path: Path) -> None:
    """The CloudWatch agent sidecar's Prometheus configuration is valid (promtool), scrapes this
    task's /metrics on localhost, and sends every metric that monitoring.yaml's alarms read, all
    of them exported by the service (docs/metrics.md); each alert of alerts.yml has its alarm."""
    from tests.test_alerts import alerts
    from tests.test_metrics_doc import documented

    td = task_definition()
    sidecar = {c["name"]: c for c in td["containerDefinitions"]}["metrics-sidecar"]
    assert sidecar["essential"] is False  # a dead sidecar never stops the service
    env = {e["name"]: e["value"] for e in sidecar["environment"]}
    scrape = env["PROMETHEUS_CONFIG_CONTENT"]
    assert "targets: ['localhost:8080']" in scrape and "metrics_path: /metrics" in scrape
    promtool = shutil.which("promtool")
    if promtool is not None:
        (tmp_path / "prometheus.yml").write_text(scrape)
        done = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
        assert done.returncode == 0, done.stdout + done.stderr
    agent = json.loads(env["CW_CONFIG_CONTENT"])["logs"]["metrics_collected"]["prometheus"]
    assert agent["prometheus_config_path"] == "env:PROMETHEUS_CONFIG_CONTENT"
    emf = agent["emf_processor"]
    sent = {s.strip("^$") for d in emf["metric_declaration"] for s in d["metric_selectors"]}
    exported = set(documented())
    assert {n.removesuffix("_bucket").removesuffix("_count") for n in sent} <= exported | {
        "listeners_publish_lag_seconds"
    }
    monitoring = (ROOT / "deploy" / "cloudformation" / "monitoring.yaml").read_text()
    assert agent["log_group_name"] in monitoring  # the log group the stack creates and allows
    read = set(re.findall(r"MetricName: (listeners_\w+)", monitoring))
    assert read and read <= sent, read - sent
    alarms = set(re.findall(r"AlarmName: (\w+)", monitoring))
    assert {a["alert"] for a in alerts()} - {"ListenersTargetDown"} <= alarms
