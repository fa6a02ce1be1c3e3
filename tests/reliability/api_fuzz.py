"""Schema-driven fuzzing of a running server with schemathesis: every operation of its OpenAPI
schema (chat, models, checkpoint admin, health, console), with bodies and parameters generated
to fit the schema (positive) and to break it (negative), a bounded number of cases each.

`fuzz_openapi` counts the cases sent and the answers that were a server error (5xx) or no answer
at all (a timeout: a hang); the pytest suite asserts there are none and `bench/reliability.py`
reports the counts. It does not judge 4xx answers: refusing a generated request is the point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FuzzReport:
    """What a schemathesis run found."""

    cases: int = 0
    server_errors: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "METHOD path -> status / error"


def fuzz_openapi(
    base_url: str,
    max_examples: int = 25,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    admin_headers: dict[str, str] | None = None,
) -> FuzzReport:
    """Send up to `max_examples` positive and as many negative cases per operation.

    Args:
        base_url: the server, e.g. http://127.0.0.1:8000 (its schema at /openapi.json).
        max_examples: cases per operation and generation mode.
        headers: sent with every case (e.g. an API key).
        admin_headers: sent instead with `/admin/...` cases (the admin key, so admin routes
            are reached); default `headers`.
        timeout_s: a case not answered in this long counts as a server error (a hang).
    """
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    report = FuzzReport()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            admin = operation.path.startswith("/admin") and admin_headers is not None
            _fuzz_operation(
                operation,
                mode,
                report,
                base_url,
                session,
                admin_headers if admin else headers,
                timeout_s,
                max_examples,
            )
    return report


def _fuzz_operation(
    operation: Any,
    mode: Any,
    report: FuzzReport,
    base_url: str,
    session: Any,
    headers: dict[str, str] | None,
    timeout_s: float,
    max_examples: int,
) -> None:
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    label = f"{operation.method.upper()} {operation.path}"

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        report.cases += 1
        report.by_operation[label] = report.by_operation.get(label, 0) + 1
        try:
            response = case.call(
                base_url=base_url, session=session, headers=headers, timeout=timeout_s
            )
        except requests.RequestException as e:
            report.server_errors += 1
            report.failures.append(f"{label} -> {type(e).__name__}")
            return
        if response.status_code >= 500:
            report.server_errors += 1
            report.failures.append(f"{label} -> {response.status_code}: {response.text[:200]}")

    try:
        run()
    except Unsatisfiable:
        pass  # nothing to break (e.g. negative cases of an operation without parameters)
