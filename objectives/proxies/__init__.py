"""Proxies: cheap scores of candidate groupings. Importing this package registers them all."""

# Imported for their registration.
from objectives.proxies import act_cos, exact, long_range, recoverable, weighted  # noqa: F401
from objectives.proxies.base import (
    PROXIES,
    GroupTableProxy,
    Proxy,
    get_proxy,
    make_proxy,
    register_proxy,
)

__all__ = ["PROXIES", "GroupTableProxy", "Proxy", "get_proxy", "make_proxy", "register_proxy"]
