"""`python -m actors.gateway`: print the OpenAPI document (docs/openapi.json)."""

import sys

from actors.gateway.openapi import text

sys.stdout.write(text())
