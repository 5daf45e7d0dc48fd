-- 0009: the web application's worklist sorted by patient name (GET /api/worklist?sort=
-- patient_name) reads one page instead of sorting every visible study: an index in exactly
-- that order (lower(patient_name) ASC NULLS LAST, study_date DESC NULLS LAST, pk DESC), the
-- ORDER BY of gateway/http/kp_api_worklist.c. Measured by bench/worklist at 100,000 studies.
CREATE INDEX studies_by_name ON studies (lower(patient_name) ASC NULLS LAST,
                                         study_date DESC NULLS LAST, pk DESC);
