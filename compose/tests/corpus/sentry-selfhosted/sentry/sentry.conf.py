# Sentry settings (excerpt). Calls the backing services by name.
DATABASES = {
    "default": {
        "ENGINE": "sentry.db.postgres",
        "NAME": "postgres",
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": "pgbouncer",
        "PORT": "",
    }
}
SENTRY_OPTIONS["redis.clusters"] = {"default": {"hosts": {0: {"host": "redis", "password": "", "port": "6379", "db": "0"}}}}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache", "LOCATION": ["memcached:11211"], "TIMEOUT": 3600}}
SENTRY_WEB_HOST = "0.0.0.0"
SENTRY_WEB_PORT = 9000
SENTRY_OPTIONS["symbolicator.options"] = {"url": "http://symbolicator:3021"}
SENTRY_OPTIONS["mail.host"] = "smtp"
DEFAULT_KAFKA_OPTIONS = {"bootstrap.servers": "kafka:9092", "message.max.bytes": 50000000}
