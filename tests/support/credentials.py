"""The suite's credentials: tests call the API as production callers do, with a key or a token."""

from __future__ import annotations

from brownout._auth.keys import SCOPES, entry_for

OPERATOR_TOKEN = "operator-token-for-tests-0123456789abcdef"  # BROWNOUT_ADMIN_TOKEN where a test is the operator
SERVICE_KEY = "bo_the-test-suite-service-key-0123456789abcdef"  # every scope: what most tests call with
SERVICE_KEY_ENTRY = entry_for("tests", SERVICE_KEY, SCOPES)
AS_SERVICE = {"Authorization": f"Bearer {SERVICE_KEY}"}
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
