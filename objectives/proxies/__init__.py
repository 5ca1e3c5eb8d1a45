"""Proxies: cheap scores of candidate groupings. Importing this package registers them all."""

from objectives.proxies import act_cos, exact, recoverable, weighted  # noqa: F401  (registration)
from objectives.proxies.base import (
    PROXIES,
    GroupTableProxy,
    Proxy,
    get_proxy,
    make_proxy,
    register_proxy,
)

__all__ = ["PROXIES", "GroupTableProxy", "Proxy", "get_proxy", "make_proxy", "register_proxy"]
