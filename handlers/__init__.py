"""thinkstream's application: the relay, its demo model and its page.

Importing any module here has no side effects; ``handlers.app.create_app``
builds everything from a :class:`handlers.config.Config`.
"""
