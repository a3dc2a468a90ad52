//! Generates the httpd/APR bindings. Every header path comes from `apxs -q` (set `APXS=` to
//! build against another httpd); nothing is hard-coded, and a missing package is named.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn apxs_query(apxs: &str, var: &str) -> String {
    let output = Command::new(apxs).args(["-q", var]).output();
    match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => fail(&format!(
            "`{apxs} -q {var}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(err) => fail(&format!(
            "cannot run `{apxs}` ({err}). Install Debian's apache2-dev package \
             (apt-get install apache2-dev), or set APXS=/path/to/apxs."
        )),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("mod_wsgi_rs build: {message}");
    std::process::exit(1);
}

fn main() {
    println!("cargo:rerun-if-changed=include/wrapper.h");
    println!("cargo:rerun-if-env-changed=APXS");
    let apxs = env::var("APXS").unwrap_or_else(|_| "apxs".to_string());

    let include_dir = apxs_query(&apxs, "INCLUDEDIR");
    let apr_include_dir = apxs_query(&apxs, "APR_INCLUDEDIR");
    let extra_cppflags = apxs_query(&apxs, "EXTRA_CPPFLAGS");
    for dir in [&include_dir, &apr_include_dir] {
        if !PathBuf::from(dir).is_dir() {
            fail(&format!(
                "header directory {dir} (from apxs) does not exist: install apache2-dev and libapr1-dev"
            ));
        }
    }

    let mut builder = bindgen::Builder::default()
        .header("include/wrapper.h")
        .clang_arg(format!("-I{include_dir}"))
        .clang_arg(format!("-I{apr_include_dir}"))
        .clang_args(extra_cppflags.split_whitespace())
        .allowlist_function("ap_.*|apr_.*|unixd_.*")
        .allowlist_var("ap_.*|AP_.*|APR_.*|apr_bucket_type_eos|APLOG_.*|HTTP_.*|OK|DECLINED|DONE|OPT_.*|RSRC_CONF|ACCESS_CONF|OR_.*|NOT_IN_.*|GLOBAL_ONLY|REQUEST_.*|M_.*|WSGIRS_.*|AP_SQ_.*|MODULE_MAGIC_.*")
        .allowlist_type("module_struct|module|command_rec|cmd_parms|request_rec|server_rec|conn_rec|process_rec|unixd_config_rec|apr_.*|ap_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    // Variadic functions and opaque handles are fine; only APR's atomic inline helpers trip
    // bindgen up on some versions, so they stay out.
    builder = builder.blocklist_function("apr_atomic_.*");

    let bindings = match builder.generate() {
        Ok(b) => b,
        Err(err) => fail(&format!(
            "bindgen could not parse the httpd headers ({err}). It needs libclang: \
             apt-get install libclang-dev clang"
        )),
    };
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR not set")));
    if let Err(err) = bindings.write_to_file(out.join("httpd_bindings.rs")) {
        fail(&format!("cannot write bindings: {err}"));
    }
}
