# A Flask application (tests/frameworks.rs), run from a virtualenv through python-home=.
# Routes: /  /items/<id>  /form (POST)  /upload (POST multipart: size, crc32 and sha256 of the
# file, checked against the crc32 form field)  /json (POST)  /cookie/set  /cookie/get
# /redirect  /boom (raises).
import hashlib
import os
import sys
import zlib

import flask
from flask import Flask, jsonify, make_response, redirect, request, url_for

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024


@app.route("/")
def index():
    return "Hello from Flask"


@app.route("/info")
def info():
    return jsonify(flask_file=flask.__file__, prefix=sys.prefix, pid=os.getpid(),
                   script_root=request.script_root, path=request.path)


@app.route("/items/<int:item_id>")
def item(item_id):
    # Django's request.path includes the mount point; Flask's does not: report the same.
    return jsonify(id=item_id, script_root=request.script_root,
                   path=request.script_root + request.path,
                   args=request.args.to_dict(flat=False), url=request.url)


@app.route("/form", methods=["POST"])
def form():
    return jsonify(fields=request.form.to_dict(flat=False))


@app.route("/upload", methods=["POST"])
def upload():
    f = request.files["file"]
    crc = 0
    size = 0
    sha = hashlib.sha256()
    while True:
        chunk = f.stream.read(65536)
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        sha.update(chunk)
        size += len(chunk)
    expected = request.form.get("crc32")
    return jsonify(filename=f.filename, size=size, crc32=crc, sha256=sha.hexdigest(),
                   ok=(expected == str(crc)), note=request.form.get("note"))


@app.route("/json", methods=["POST"])
def json_echo():
    data = request.get_json()
    return jsonify(received=data, total=sum(data.get("numbers", [])))


@app.route("/cookie/set")
def cookie_set():
    resp = make_response("cookies set")
    resp.set_cookie("flavour", "oatmeal")
    resp.set_cookie("colour", "blue", httponly=True)
    return resp


@app.route("/cookie/get")
def cookie_get():
    return jsonify(cookies=request.cookies.to_dict())


@app.route("/redirect")
def go_home():
    return redirect(url_for("index"))


@app.route("/boom")
def boom():
    raise RuntimeError("flask-boom")


application = app
