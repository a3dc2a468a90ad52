# A single-file Django project (tests/frameworks.rs), run from a virtualenv through
# python-home=: settings in code (DEBUG False, ALLOWED_HOSTS ['*'], no database), the URLconf
# a module made here. Routes as flask_app.wsgi, plus /protected (POST, CSRF-protected).
import hashlib
import json
import os
import sys
import types
import zlib

import django
from django.conf import settings

URLCONF = "mod_wsgi_rs_django_urls"

if not settings.configured:
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="mod_wsgi_rs-test-only-not-a-secret",
        ROOT_URLCONF=URLCONF,
        MIDDLEWARE=[
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
        ],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
        DATA_UPLOAD_MAX_MEMORY_SIZE=4 * 1024 * 1024,
        LOGGING_CONFIG=None,
    )
    django.setup()

from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.shortcuts import redirect  # noqa: E402
from django.urls import path, reverse  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


def index(request):
    return HttpResponse("Hello from Django", content_type="text/plain")


def info(request):
    return JsonResponse({"django_file": django.__file__, "prefix": sys.prefix,
                         "pid": os.getpid(), "script_name": request.META.get("SCRIPT_NAME"),
                         "path": request.path, "path_info": request.path_info})


def item(request, item_id):
    return JsonResponse({"id": item_id, "path": request.path,
                         "args": {k: request.GET.getlist(k) for k in request.GET},
                         "url": request.build_absolute_uri()})


@csrf_exempt
def form(request):
    return JsonResponse({"fields": {k: request.POST.getlist(k) for k in request.POST}})


@csrf_exempt
def upload(request):
    f = request.FILES["file"]
    crc = 0
    size = 0
    sha = hashlib.sha256()
    for chunk in f.chunks(65536):
        crc = zlib.crc32(chunk, crc)
        sha.update(chunk)
        size += len(chunk)
    expected = request.POST.get("crc32")
    return JsonResponse({"filename": f.name, "size": size, "crc32": crc,
                         "sha256": sha.hexdigest(), "ok": expected == str(crc),
                         "note": request.POST.get("note")})


@csrf_exempt
def json_echo(request):
    data = json.loads(request.body)
    return JsonResponse({"received": data, "total": sum(data.get("numbers", []))})


def protected(request):
    return HttpResponse("csrf passed", content_type="text/plain")


def cookie_set(request):
    resp = HttpResponse("cookies set", content_type="text/plain")
    resp.set_cookie("flavour", "oatmeal")
    resp.set_cookie("colour", "blue", httponly=True)
    return resp


def cookie_get(request):
    return JsonResponse({"cookies": dict(request.COOKIES)})


def go_home(request):
    return redirect(reverse("index"))


def boom(request):
    raise RuntimeError("django-boom")


urls = types.ModuleType(URLCONF)
urls.urlpatterns = [
    path("", index, name="index"),
    path("info", info),
    path("items/<int:item_id>", item),
    path("form", form),
    path("upload", upload),
    path("json", json_echo),
    path("protected", protected),
    path("cookie/set", cookie_set),
    path("cookie/get", cookie_get),
    path("redirect", go_home),
    path("boom", boom),
]
sys.modules[URLCONF] = urls

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
