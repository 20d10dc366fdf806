"""agent_base_uri (passenger_base_uri): an app under a sub-URI gets it as
SCRIPT_NAME, so that its URL building stays there. examples/django, in its
own virtualenv (`make django-venv`), served under /shop/."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import REPO, AppSpec, Stack, example_venv, nginx_t_with, running_stack, started

EXAMPLE = REPO / "examples" / "django"
BUILT_VENV = REPO / "build" / "django-venv"
SHOP = AppSpec("shop", "", "/shop/")


class ShopStack(Stack):
    """The Django example at /shop/: its static files through alias, the
    rest to the app with the base URI."""

    def __init__(self, root: Path, venv_python: str) -> None:
        super().__init__(root, [SHOP])
        self.venv_python = venv_python

    def write_apps(self) -> None:
        """The project is copied in by the fixture, not written from a source."""

    def location_block(self, app: AppSpec) -> str:
        lines = [
            "location /shop/ {",
            f"    alias {self.app_root(app) / 'public'}/;",
            "    agent_enabled on;",
            f"    agent_app_root {self.app_root(app)};",
            f"    agent_python {self.venv_python};",
            "    agent_base_uri /shop;",
            "}",
        ]
        return "\n".join("        " + line for line in lines)


@pytest.fixture(scope="module")
def shop() -> Iterator[ShopStack]:
    root = Path(tempfile.mkdtemp(prefix="agent-shop-", dir="/tmp"))
    try:
        shutil.copytree(EXAMPLE, root / "apps" / "shop", ignore=shutil.ignore_patterns("__pycache__", "db.sqlite3"))
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        python = example_venv(EXAMPLE, BUILT_VENV, root / "venv")
        with started(ShopStack(root, python)) as stack:
            yield stack
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_django_under_a_base_uri_builds_its_urls_there(shop: ShopStack) -> None:
    hello = shop.get("/shop/", timeout=60)
    assert (hello.status, hello.text) == (200, "Hello, world\n")
    assert shop.get("/shop/page").status == 200            # PATH_INFO is the rest: /page

    # The admin's redirect to its login page, built by reverse() and the
    # request's full path: both under the base.
    admin = shop.get("/shop/admin/")
    assert admin.status == 302
    assert admin.headers["location"] == "/shop/admin/login/?next=/shop/admin/"

    login = shop.get("/shop/admin/login/?next=/shop/admin/")
    assert login.status == 200
    assert 'action="/shop/admin/login/?next=/shop/admin/"' in login.text
    assert 'href="/shop/static/admin/css/' in login.text   # STATIC_URL is relative: under the base too

    robots = shop.get("/shop/robots.txt")                   # a static file: nginx's, through alias
    assert robots.status == 200 and robots.body == (shop.app_root(SHOP) / "public" / "robots.txt").read_bytes()


# Answers with the two variables the split makes.
SPLIT = """
def application(environ, start_response):
    body = ("%s|%s" % (environ["SCRIPT_NAME"], environ["PATH_INFO"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""


def test_several_base_uris_the_longest_match_wins() -> None:
    app = AppSpec("split", SPLIT, "/", directives={"agent_base_uri": "/a/;\n    agent_base_uri /a/b;\n"
                                                                       "    agent_base_uri /c"})
    with running_stack([app]) as stack:
        assert stack.get("/a/x").text == "/a|/x"
        assert stack.get("/a").text == "/a|"
        assert stack.get("/a/b/y").text == "/a/b|/y"
        assert stack.get("/a/bc").text == "/a|/bc"           # /a/b is no prefix of /a/bc's path segments
        assert stack.get("/cd").text == "|/cd"
        assert stack.get("/c/").text == "/c|/"
        assert stack.get("/other").text == "|/other"
        assert stack.get("/").text == "|/"


@pytest.mark.parametrize("value", ["shop", "/shop?x=1"])
def test_a_base_uri_must_be_a_path(value: str) -> None:
    result = nginx_t_with(f"agent_base_uri {value};")
    assert result.returncode != 0
    assert "agent_base_uri" in result.stderr
