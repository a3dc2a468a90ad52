/* The only bindgen input: the httpd and APR declarations mod_wsgi_rs uses. */
#include <httpd.h>
#include <http_config.h>
#include <http_core.h>
#include <http_log.h>
#include <http_main.h>
#include <http_protocol.h>
#include <http_request.h>
#include <ap_mpm.h>
#include <ap_listen.h>
#include <mpm_common.h>
#include <unixd.h>
#include <util_script.h>
#include <util_filter.h>
#include <scoreboard.h>
#include <apr_shm.h>
#include <apr_portable.h>
#include <apr_pools.h>
#include <apr_strings.h>
#include <apr_tables.h>
#include <apr_thread_proc.h>
#include <apr_buckets.h>

/* Macros bindgen cannot evaluate (casts, expressions), copied as plain constants. */
static const unsigned long WSGIRS_MODULE_MAGIC_COOKIE = MODULE_MAGIC_COOKIE;
static const int WSGIRS_MODULE_MAGIC_NUMBER_MAJOR = MODULE_MAGIC_NUMBER_MAJOR;
static const int WSGIRS_MODULE_MAGIC_NUMBER_MINOR = MODULE_MAGIC_NUMBER_MINOR;
