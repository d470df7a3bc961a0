"""Every route has one policy, declared beside it, and everything that needs a route's policy reads it there."""

from starlette.routing import Route

from api.access import requirement
from api.app import PROTOCOLS
from api.policy import ROUTES, Matcher, RoutePolicy, RouteTable
from deployments.ingress import IngressConfig


def test_every_route_of_the_app_has_a_policy_and_every_policy_a_route(api):
    own = {route.path for route in api.app.router.routes if isinstance(route, Route)}  # /openapi.json, /docs
    served = own | {route.path for protocol in PROTOCOLS for route in protocol.router.routes}
    assert len(served) > 20
    assert served - set(ROUTES) == set(), "routes without a policy: declare one beside the route (api.policy)"
    assert set(ROUTES) - served == set(), "policies of routes the app does not serve"


def test_a_route_that_shares_a_count_has_no_limits_of_its_own_and_shares_a_limited_one():
    for template, policy in ROUTES.items():
        if policy.shares is not None:
            assert ROUTES[policy.shares].ingress is not None, template
            assert ROUTES.admission_key(template) == policy.shares


def test_the_ingress_and_the_proxy_limit_the_same_routes_and_the_yaml_overrides_only_what_it_names():
    assert set(ROUTES.ingress_limits()) == set(ROUTES.proxy_limits())
    config = IngressConfig(admission={"/v1/text/embed": 3})
    limits = config.admission_limits()
    assert limits["/v1/text/embed"] == 3 and limits["/v1/vision/classify"] == ROUTES["/v1/vision/classify"].ingress


def test_access_control_reads_the_family_and_the_models_from_the_policy():
    needed = requirement("/v2/models/{model_name}/infer", "/v2/models/text/infer", {"model_name": "text"})
    assert (needed.family, needed.models) == ("v2", frozenset({"text"}))
    needed = requirement("/v1/multimodal/analyze", "/v1/multimodal/analyze", {})
    assert (needed.family, needed.models) == ("v1", frozenset({"vision", "text", "fusion"}))
    assert requirement("/readyz", "/readyz", {}) is None
    assert requirement(None, "/v2/nowhere", {}).family == "v2"  # an unknown path needs a key too


def test_a_route_declared_twice_differently_is_refused():
    table = RouteTable()
    table.declare("/x", RoutePolicy("v1", ingress=1, proxy=2))
    table.declare("/x", RoutePolicy("v1", ingress=1, proxy=2))  # the same again (a module imported twice)
    try:
        table.declare("/x", RoutePolicy("v1", ingress=2, proxy=2))
    except ValueError as exc:
        assert "/x" in str(exc)
    else:
        raise AssertionError("a second, different policy was accepted")


def test_paths_match_their_templates_as_the_router_would():
    matcher = Matcher(["/v1/text/embed", "/v2/models/{model_name}/infer"])
    assert matcher.match("/v1/text/embed") == "/v1/text/embed"
    assert matcher.match("/v2/models/vision/infer") == "/v2/models/{model_name}/infer"
    assert matcher.match("/v2/models/vision/infer/extra") is None and matcher.match("/v1/text") is None
    long = Matcher(ROUTES.long_routes())
    assert long.match("/v1/chat/completions") and not long.match("/v1/text/embed")
