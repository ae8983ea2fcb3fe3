"""Example third-party prunekit plugins: a layer scorer (:mod:`.scorer`), a round-to-nearest
quantizer (:mod:`.quantizer`) and a norm-only recovery method (:mod:`.recovery`), registered
by :mod:`.hooks` through the ``prunekit`` entry-point group."""
