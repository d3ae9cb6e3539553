import sys

from recipes.generate import main

sys.exit(main())
