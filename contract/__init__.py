"""The contract between GemServe and its clients, a leaf of the import graph: the HTTP request
and response models (``protocol``), the needle-in-a-haystack prompt builders that the server's
demo, the load tester and the eval suite share (``needles``), and the one grammar that names a
compression method on a command line (``methods``). It imports no torch and no other package of
the repository, so the SDK (``clients``) and ``evals`` depend on it and never on ``server``."""
