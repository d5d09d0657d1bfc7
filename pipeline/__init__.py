"""hiddenstate's online side: serve an exported recurrent step over Kafka.

Never imports torch or `export`: the serving image has neither.
"""

__version__ = "0.1.0"
