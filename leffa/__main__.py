from leffa.cli import main

raise SystemExit(main())
