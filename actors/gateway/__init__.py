"""The REST gateway: the Go daemon's HTTP API over volumed's NATS commands and queries."""

from actors.gateway.actor import DEFAULT_ADDRESS, GatewayActor

__all__ = ["DEFAULT_ADDRESS", "GatewayActor"]
