// Agora's one script: live progress of a job on the page that shows it. Every page works
// without it; a page opts in with an element carrying data-job-status="URL" (a JSON
// endpoint of the pages). Loaded from this origin only (Content-Security-Policy).
"use strict";
