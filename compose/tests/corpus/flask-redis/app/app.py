import os
from flask import Flask
from redis import Redis
app = Flask(__name__)
redis = Redis(host=os.environ["REDIS_HOST"], port=6379)
