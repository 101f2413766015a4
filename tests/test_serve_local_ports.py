"""Local runs side by side must not share a port: Serve's HAProxy mode has fixed default ports, and
some of its listeners bind with SO_REUSEPORT, where a shared port silently mixes two Rays' traffic."""

from tools import serve_local

# Ray 2.60's Serve settings that name a port its HAProxy mode listens on.
PORT_SETTINGS = ["RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]


def test_every_port_setting_is_one_ray_2_60_reads():
    """If Ray renames one, setting it here would do nothing: fail, and name it."""
    import ray.serve._private.constants as constants

    source = open(constants.__file__).read()
    assert [name for name in PORT_SETTINGS if f'"{name}"' not in source] == []


def test_two_local_runs_get_distinct_ports_for_every_serve_listener():
    first, second = (serve_local.LocalServe({"http_options": {"port": 8000}, "applications": []}) for _ in range(2))
    assert first.haproxy and second.haproxy, "the chart's default ingress is HAProxy"
    for name in PORT_SETTINGS:
        assert name in first.ingress_env and name in second.ingress_env, name
    ports = [int(run.ingress_env[name]) for run in (first, second) for name in PORT_SETTINGS]
    assert len(set(ports)) == len(ports), dict(zip(PORT_SETTINGS * 2, ports))
