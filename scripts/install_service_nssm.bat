@echo off
rem Instala o monitor como servico do Windows com o NSSM 2.24-101 ou mais novo (https://nssm.cc).
rem Uso (Prompt de Comando como Administrador):
rem   scripts\install_service_nssm.bat [NomeDoServico] [Conta]
rem Conta: DOMINIO\usuario ou .\usuario (a senha e pedida sem eco; numa instalacao automatica, e
rem a primeira linha da entrada padrao, redirecionada de um arquivo), DOMINIO\gmsa$ (gMSA, sem senha) ou
rem "NT SERVICE\NomeDoServico" (conta virtual, sem senha). Sem conta: LocalSystem.
rem A senha nunca vai na linha de comando do script: ficaria no historico do console.
rem Pastas: o projeto fica gravavel so por SYSTEM e Administradores (a conta do servico le);
rem completo\ (falhas com dados de pacientes, logs) so SYSTEM, Administradores e a conta.
rem Grupos por SID (*S-1-5-18 = SYSTEM, *S-1-5-32-544 = Administradores), nunca por nome.
setlocal EnableExtensions DisableDelayedExpansion
set "SERVICE=%~1"
if not defined SERVICE set "SERVICE=BemsoftMonitor"
set "ACCOUNT=%~2"
set "EXTRA=%~3"
for %%I in ("%~dp0..") do set "ROOT=%%~fI"
set "PY=%ROOT%\.venv\Scripts\python.exe"
set "LOGS=%ROOT%\completo\logs"

if defined EXTRA goto password_argument
where nssm >nul 2>nul
if errorlevel 1 goto no_nssm
if not exist "%PY%" goto no_venv
findstr /i /c:"WindowsApps" /c:"AppData" "%ROOT%\.venv\pyvenv.cfg" >nul 2>nul
if not errorlevel 1 goto user_python
if not exist "%ROOT%\.env" goto no_env
if not exist "%LOGS%" mkdir "%LOGS%"
cd /d "%ROOT%"

rem Conta do servico: .\usuario vira MAQUINA\usuario para o icacls (que nao entende ".\").
rem Sem conta, ACCOUNT nao existe: teste-o antes de tirar um pedaco dele (ACCOUNT:~0,2); de uma
rem variavel inexistente o cmd apaga o nome e le o resto da linha como outras variaveis.
set "ACL_ACCOUNT="
if not defined ACCOUNT goto account_ready
set "ACL_ACCOUNT=%ACCOUNT%"
if "%ACCOUNT:~0,2%"==".\" set "ACL_ACCOUNT=%COMPUTERNAME%\%ACCOUNT:~2%"
:account_ready

rem Servico: o Python da .venv roda monitor_bemsoft.py na pasta do projeto (caminho relativo:
rem nada de caminho com espacos ou parenteses nos parametros)
nssm install "%SERVICE%" "%PY%" monitor_bemsoft.py || goto nssm_failed
nssm set "%SERVICE%" AppDirectory "%ROOT%" || goto nssm_failed
nssm set "%SERVICE%" DisplayName "Bemsoft Monitor (SQL -> Bemsoft)" || goto nssm_failed
nssm set "%SERVICE%" Description "Envia os exames terceirizados do sistema legado para a API Bemsoft." || goto nssm_failed
rem Console proprio (necessario para a parada por Ctrl+C) e saida em UTF-8 sem buffer
nssm set "%SERVICE%" AppNoConsole 0 || goto nssm_failed
nssm set "%SERVICE%" AppEnvironmentExtra PYTHONIOENCODING=utf-8 PYTHONUNBUFFERED=1 || goto nssm_failed
rem stdout/stderr em arquivos com rotacao a cada 10 MB (o log completo fica no LOG_FILE do monitor;
rem com LOG_FILE definido, o console recebe so avisos e erros)
nssm set "%SERVICE%" AppStdout "%LOGS%\service.out.log" || goto nssm_failed
nssm set "%SERVICE%" AppStderr "%LOGS%\service.err.log" || goto nssm_failed
nssm set "%SERVICE%" AppRotateFiles 1 || goto nssm_failed
nssm set "%SERVICE%" AppRotateOnline 1 || goto nssm_failed
nssm set "%SERVICE%" AppRotateBytes 10485760 || goto nssm_failed
rem Parada: Ctrl+C no console (o monitor termina a solicitacao em andamento); 120 s de espera
nssm set "%SERVICE%" AppStopMethodSkip 6 || goto nssm_failed
nssm set "%SERVICE%" AppStopMethodConsole 120000 || goto nssm_failed
rem Reinicia sozinho em caso de falha, exceto erro de configuracao (codigo 2)
nssm set "%SERVICE%" AppExit Default Restart || goto nssm_failed
nssm set "%SERVICE%" AppExit 2 Exit || goto nssm_failed
nssm set "%SERVICE%" AppRestartDelay 10000 || goto nssm_failed
nssm set "%SERVICE%" Start SERVICE_AUTO_START || goto nssm_failed
if not defined ACCOUNT goto localsystem
rem A conta (nssm set ObjectName): a senha e pedida sem eco pelo Python da .venv, que a entrega
rem ao NSSM como argumento (veja o README); gMSA e contas virtuais nao tem senha
"%PY%" -m bemsoft_monitor.service_account "%SERVICE%" "%ACCOUNT%" || goto account_failed
goto acls
:localsystem
echo Aviso: sem conta informada, o servico roda como LocalSystem. Prefira uma conta de servico ou gMSA.

:acls
rem Projeto: heranca removida; SYSTEM e Administradores com controle total; a conta do servico so le
icacls "%ROOT%" /reset /T /C /Q >nul
icacls "%ROOT%" /inheritance:r /grant:r *S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F /C /Q || goto acl_failed
rem completo\ (falhas, logs, pids): ACL propria, nao herdada, legivel so por eles
icacls "%ROOT%\completo" /inheritance:r /grant:r *S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F /C /Q || goto acl_failed
if not defined ACCOUNT goto done
icacls "%ROOT%" /grant:r "%ACL_ACCOUNT%:(OI)(CI)RX" /C /Q || goto acl_failed
icacls "%ROOT%\completo" /grant:r "%ACL_ACCOUNT%:(OI)(CI)M" /C /Q || goto acl_failed

:done
echo.
echo Servico %SERVICE% instalado. Inicie com:  nssm start %SERVICE%
echo Logs: "%LOGS%"
exit /b 0

:no_nssm
echo NSSM nao encontrado no PATH. Instale o NSSM 2.24-101 ou mais novo e tente de novo.
exit /b 1
:no_venv
echo Falta a .venv do projeto: py -3 -m venv .venv e .venv\Scripts\python.exe -m pip install -r requirements.txt
exit /b 1
:user_python
echo A .venv foi criada com um Python instalado so para um usuario (AppData ou Microsoft Store),
echo que a conta do servico nao consegue ler. Instale o Python para todos os usuarios e recrie a .venv.
exit /b 1
:no_env
echo Falta o arquivo .env na pasta do projeto (copie de .env.example).
exit /b 1
:nssm_failed
echo O NSSM recusou a configuracao (veja a mensagem acima). Remova com scripts\uninstall_service_nssm.bat "%SERVICE%" e tente de novo.
exit /b 1
:account_failed
echo A conta do servico nao foi configurada (veja a mensagem acima). Remova com scripts\uninstall_service_nssm.bat "%SERVICE%" e tente de novo.
exit /b 1
:password_argument
echo A senha nao e aceita na linha de comando (ficaria no historico do console): informe so o
echo servico e a conta, e a senha e pedida sem eco. Numa instalacao automatica, passe a senha na
echo entrada padrao: scripts\install_service_nssm.bat "%SERVICE%" "%ACCOUNT%" ^< senha.txt
exit /b 2
:acl_failed
echo O icacls falhou (veja a mensagem acima): confira o nome da conta e rode como Administrador.
exit /b 1
