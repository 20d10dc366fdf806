
/*
 * What the fast path's table files share: this worker's view of the table,
 * set up in ngx_http_agent_fastpath.c and worked on by the claims in
 * ngx_http_agent_claims.c.  The rest of the module reaches the fast path
 * through ngx_http_agent_module.h only.
 */


#ifndef _NGX_HTTP_AGENT_FASTPATH_H_INCLUDED_
#define _NGX_HTTP_AGENT_FASTPATH_H_INCLUDED_


#include "ngx_http_agent_module.h"


/* inherited from the master: the mapping, or NULL when the fast path is off */
extern agent_fp_table  *ngx_http_agent_fp_table;

/* this worker's */
extern ngx_int_t        ngx_http_agent_fp_me;          /* procs[] row */
extern ngx_queue_t      ngx_http_agent_fp_fifo[AGENT_FP_APPS];
extern ngx_uint_t       ngx_http_agent_fp_waiters;

/* ngx_http_agent_fastpath.c: the wake-ups and the clock */
void ngx_http_agent_fp_arm_retry(void);
void ngx_http_agent_fp_wake_other(ngx_uint_t row);
uint64_t ngx_http_agent_fp_now_ms(void);

/* ngx_http_agent_claims.c: what a wake-up or the retry timer runs */
void ngx_http_agent_fp_serve_waiters(ngx_uint_t row);


#endif /* _NGX_HTTP_AGENT_FASTPATH_H_INCLUDED_ */
