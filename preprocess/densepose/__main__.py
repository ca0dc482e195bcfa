import sys

from preprocess.densepose.weights import main

sys.exit(main())
