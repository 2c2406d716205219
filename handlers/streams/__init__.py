"""The streams: generations that read a provider into a log, and the sinks their readers write to."""
