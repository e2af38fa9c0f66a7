from mergelab.cli import main

raise SystemExit(main())
