import os

DATABASE_DIALECT = os.getenv("DATABASE_DIALECT")
SQLALCHEMY_DATABASE_URI = (
    f"{DATABASE_DIALECT}://{os.getenv('DATABASE_USER')}:{os.getenv('DATABASE_PASSWORD')}@"
    f"{os.getenv('DATABASE_HOST')}:{os.getenv('DATABASE_PORT')}/{os.getenv('DATABASE_DB')}"
)
REDIS_HOST = os.getenv("REDIS_HOST", "redis")
REDIS_PORT = os.getenv("REDIS_PORT", "6379")
