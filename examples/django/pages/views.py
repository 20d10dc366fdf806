"""The example's two views: plain text, and a page rendered from a template."""

import os

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

HELLO = "Hello, world\n"


def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse(HELLO, content_type="text/plain")


def page(request: HttpRequest) -> HttpResponse:
    items = [f"item {n}" for n in range(1, 11)]
    return render(request, "pages/page.html", {"items": items, "pid": os.getpid()})
