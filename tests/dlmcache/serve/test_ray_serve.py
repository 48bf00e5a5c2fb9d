"""The Ray Serve deployment on a local CPU Ray cluster, with the `openai` client (skips without ray)."""

import socket

import pytest

from dlmcache import tinytask

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_answer_like_the_pipeline_alone():
    import ray
    from ray import serve

    from dlmcache.serve import DEFAULT_CACHE, load_pipeline
    from dlmcache.serve.ray_serve import ray_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app("dlmcache/tiny", num_replicas=2, num_cpus=0.5, threads=1), route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reference = load_pipeline("dlmcache/tiny", DEFAULT_CACHE)
        for problem in tinytask.test_problems(4):
            chat = tinytask.messages(problem)
            r = client.chat.completions.create(model="dlmcache/tiny", messages=chat, max_tokens=64)
            want = reference(chat, max_new_tokens=64, block_length=32, stop_at_eos=True).texts[0]
            assert r.choices[0].message.content == want
        assert [m.id for m in client.models.list().data] == ["dlmcache/tiny"]
    finally:
        serve.shutdown()
        ray.shutdown()
